"""The client SDK for encrypted queries over the network. Not built yet; the in-process
pipeline it will drive is ``models.Pipeline``."""
