"""The HTTP face of the identity server; imports indexer, never the other way round."""
