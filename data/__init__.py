"""Data that the stages share: record schemas (README.md), small problem sets, and the toy world.

The toy world (`data/toyworld/`) builds arithmetic word problems, a tokenizer and tiny random models so
that every stage runs for real on a CPU: `python -m data.toyworld build --out cache/toyworld`.
"""
