"""Text in, batches out: vocabularies, corpora and archives, the token cache, batch orders, the DataModule."""
