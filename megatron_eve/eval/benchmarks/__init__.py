"""The benchmarks' own files (SEED-Bench, GQA, MME, TextVQA, MMBench), read and scored as EVE's scripts do."""
