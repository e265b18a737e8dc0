"""DID documents, A2A agent cards, ANP descriptions and the card index. Not built yet."""
