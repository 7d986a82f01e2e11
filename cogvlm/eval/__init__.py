"""`cogvlm eval --task`: the published benchmarks, read from their publishers' files, answered by
the generation engine as a resumable job, and scored with the official metrics.

formats/   one reader per file format (VQAv2 JSON, GQA, Karpathy, RefCOCO pickle, POPE, TSV, ...)
metrics    the official metrics; prompts: what each task asks, with sources
tasks      the benchmark table; runner: the job; report: tables and --compare
jsonl      evaluation on a JSONL set in the training format
The command line is cogvlm/cli/eval.py.
"""
