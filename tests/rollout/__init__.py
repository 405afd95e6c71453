"""Tests of the rollout server (fabric/rollout): real servers on the tiny model, called over gRPC."""
