"""Data preparation: source adapters and Ray Data pipelines (preference mix -> judge prompts, chains -> SFT rows).

readers     read_table: local json/jsonl/parquet or a hub dataset, every row numbered within its file
sources     one adapter per schema (raw record -> PreferencePair or RowError), pair_uid
outcomes    one outcome row per input row; counting, rejects.jsonl, the reject threshold
pipeline    Ray Data plumbing and the train/val split rule (split_of)
preference  the preference pipeline (pass 1, driver decisions, pass 2)
sft         teacher chains -> SFT rows
"""
