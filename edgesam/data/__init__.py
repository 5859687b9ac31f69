"""Data formats: the embedded benchmark, SA-1B and COCO reading, WebDataset shards, SAM transforms."""
