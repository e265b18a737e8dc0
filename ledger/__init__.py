"""Append-only Merkle log with signed checkpoints, witnesses and receipts. Not built yet."""
