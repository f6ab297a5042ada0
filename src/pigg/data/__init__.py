"""User data: files (pickle, JSONL), validation, users, the processor, collation and label masks."""
