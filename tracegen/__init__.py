"""tracegen: problems -> teacher -> trace shards.  Run: python -m tracegen --config recipes/<x>/tracegen.yaml"""
