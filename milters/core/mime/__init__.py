"""MIME reading and writing shared by the milters that change messages: byte-range scanning,
attachment finding, streamed decoding and rebuilding, safe file names."""
