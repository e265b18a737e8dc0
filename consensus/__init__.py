"""Replica planning, output comparison, verdicts and rankings (pure logic). Not built yet."""
