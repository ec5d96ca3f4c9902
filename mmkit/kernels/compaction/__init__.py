"""Token compaction on the device: keep all non-candidates plus the top-k candidates per row, no host sync."""
