"""The judge as a service.

    app        Ray Serve application: FastAPI ingress -> batched JudgeModel engine replicas
    schemas    request/response bodies (the OpenAPI schema at /docs)
    judging    generations -> verdicts, both-orders agreement, round-robin and knockout rankings
    client     JudgeClient: judge()/rank() over HTTP with retries (needs only httpx)
    reward_fn  verl-style compute_score(data_source, solution_str, ground_truth, extra_info)

Importing this package loads neither Ray nor FastAPI: clients and reward functions stay light.
"""

from rmr1_ray.serving.client import JudgeClient, JudgeClientError

__all__ = ["JudgeClient", "JudgeClientError"]
