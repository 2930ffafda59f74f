"""The judge service over real HTTP: Ray Serve on 127.0.0.1, the tiny model on the hf engine.

One application for the whole module (deploying takes most of the time). The tiny model writes noise,
so verdicts are mostly "none": the tests check shapes, status codes, the winner rules, batching, and
that the server keeps serving after bad requests.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve
from servers import free_port, write_prompt_rows

from jobs import generate_chains
from jobs.serve_judge import deploy
from rmr1_ray.config.serve import ServeConfig
from rmr1_ray.serving import JudgeClient, JudgeClientError
from rmr1_ray.serving.reward_fn import compute_score, compute_score_batch
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.integration

KEY_ENV, KEY = "RMR1_TEST_JUDGE_KEY", "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 64 * 1024
GOOD = {"question": "What is 2 + 3?", "response_a": "2 + 3 = 5.", "response_b": "2 + 3 = 6."}



@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model = make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    # Set before Ray starts: the local cluster's workers, hence the ingress replica, inherit it.
    os.environ[KEY_ENV] = KEY
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    config = ServeConfig.model_validate({
        "model": {"path": str(model)},
        "sampling": {"max_new_tokens": 16},
        # A generous wait, so that concurrent requests reliably meet in one batch on a busy machine.
        "replicas": {"max_batch_size": 8, "batch_wait_timeout_s": 0.3, "max_ongoing_requests": 16},
        "http": {"port": free_port(), "api_key_env": KEY_ENV},
        "limits": {"max_request_bytes": MAX_BYTES, "request_timeout_s": 60, "max_new_tokens": 32,
                   "max_prompt_tokens": 2048, "max_rank_responses": 4},
    })
    try:
        yield deploy(config)
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def post(http: httpx.Client, path: str, body: dict, headers: dict = AUTH) -> httpx.Response:
    return http.post(path, json=body, headers=headers)


def check_run(run: dict, order: str) -> None:
    assert run["order"] == order
    assert run["verdict"] in ("A", "B", "none")
    assert isinstance(run["raw_text"], str) and isinstance(run["format_valid"], bool)
    assert run["format_valid"] == (run["format_problems"] == [])
    assert 1 <= run["completion_tokens"] <= 16 and run["prompt_tokens"] > 100  # the system prompt alone
    assert run["batch_size"] >= 1
    for key in ("task_type", "rubric", "solution", "eval_text"):
        assert key in run


def test_health_docs_and_model_info(http, url):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"ready": True}
    assert http.get("/docs").status_code == 200
    assert {"/v1/judge", "/v1/rank", "/v1/model"} <= set(http.get("/openapi.json").json()["paths"])
    info = http.get("/v1/model", headers=AUTH).json()
    assert (info["engine"], info["prompt_format"], info["device"], info["auth"]) == ("hf", "instruct", "cpu", True)
    assert info["sampling"]["max_new_tokens"] == 16 and info["limits"]["max_request_bytes"] == MAX_BYTES
    assert info["batching"]["max_batch_size"] == 8


def test_judge_one_order(http):
    r = post(http, "/v1/judge", GOOD)
    assert r.status_code == 200, r.text
    body = r.json()
    check_run(body, "AB")
    assert body["winner"] == body["verdict"]  # one order: the judge's verdict is the winner
    assert body["consistent"] is None and body["swapped"] is None
    assert body["latency_s"] > 0 and body["model"].endswith("model")


def test_judge_both_orders_with_a_conversation(http):
    messages = [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7 is prime."},
        {"role": "user", "content": "Another one?"},
    ]
    r = post(http, "/v1/judge", {"messages": messages, "response_a": "11.", "response_b": "9.", "both_orders": True})
    assert r.status_code == 200, r.text
    body = r.json()
    check_run(body, "AB")
    check_run(body["swapped"], "BA")
    first, second = body["verdict"], body["swapped"]["verdict"]
    expected = "none" if "none" in (first, second) else first if first == second else "inconsistent"
    assert body["winner"] == expected
    assert body["consistent"] == (first == second != "none")


def test_rank_round_robin(http):
    r = post(http, "/v1/rank", {"question": "2 + 2?", "responses": ["4", "5", "four"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "round_robin"
    assert sorted((min(m["a"], m["b"]), max(m["a"], m["b"])) for m in body["matches"]) == [(0, 1), (0, 2), (1, 2)]
    table = body["table"]
    for i in range(3):
        assert table[i][i] is None
        for j in range(3):
            if i != j:
                assert table[i][j] + table[j][i] == 1.0
    assert sorted(e["index"] for e in body["ranking"]) == [0, 1, 2]
    assert sum(e["score"] for e in body["ranking"]) == 3.0  # one point per match
    scores = [e["score"] for e in body["ranking"]]
    assert scores == sorted(scores, reverse=True)


def test_rank_knockout(http):
    r = post(http, "/v1/rank", {"question": "2 + 2?", "responses": ["4", "5", "four"], "method": "knockout"})
    assert r.status_code == 200, r.text
    body = r.json()
    rounds = [m["round"] for m in body["matches"]]
    assert rounds == [1, 2]  # 0 v 1 (2 has a bye), then the winner v 2
    first, final = body["matches"]
    assert {first["a"], first["b"]} == {0, 1} and first["advanced"] in (0, 1)
    assert {final["a"], final["b"]} == {first["advanced"], 2}
    champion = body["ranking"][0]
    assert champion == {"index": final["advanced"], "score": 2.0}


def test_concurrent_requests_share_batches(http):
    def one(i: int) -> httpx.Response:
        return post(http, "/v1/judge", {**GOOD, "response_b": f"2 + 3 = {6 + i}."})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert max(r.json()["batch_size"] for r in responses) > 1
    stats = http.get("/v1/model", headers=AUTH).json()["batching"]
    assert stats["largest_batch"] > 1
    assert sum(int(size) * n for size, n in stats["histogram"].items()) == stats["prompts"]


def test_api_key(http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = post(http, "/v1/judge", GOOD, headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
    assert http.get("/v1/model").status_code == 401
    assert post(http, "/v1/judge", GOOD).status_code == 200


def chunks(total: int):
    # A generator body is sent chunked, with no Content-Length: the limit must hold while reading.
    yield b'{"question": "'
    for _ in range(total // 4096):
        yield b"x" * 4096
    yield b'", "response_a": "a", "response_b": "b"}'


BAD = {
    "malformed JSON": (400, {"content": b'{"question": "q", "response_a": ', "headers": {"content-type": "application/json"}}),
    "missing field": (422, {"json": {"question": "q", "response_a": "a"}}),
    "number for text": (422, {"json": {**GOOD, "response_a": 5}}),
    "string for boolean": (422, {"json": {**GOOD, "both_orders": "yes"}}),
    "unknown field": (422, {"json": {**GOOD, "temprature": 0.5}}),
    "question and messages": (422, {"json": {**GOOD, "messages": [{"role": "user", "content": "q"}]}}),
    "blank response": (422, {"json": {**GOOD, "response_b": "   "}}),
    "conversation ending with assistant": (422, {"json": {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "response_a": "a", "response_b": "b"}}),
    "max_tokens over the limit": (422, {"json": {**GOOD, "max_tokens": 1000}}),
    "prompt over max_prompt_tokens": (422, {"json": {**GOOD, "question": "seven " * 5000}}),
    "huge body": (413, {"json": {**GOOD, "question": "x" * (2 * MAX_BYTES)}}),
    "huge chunked body": (413, {"content": chunks, "headers": {"content-type": "application/json"}}),
    "deadline": (504, {"json": {**GOOD, "timeout_s": 0.001}}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_4xx_and_the_server_keeps_serving(http, case):
    status, kwargs = BAD[case]
    kwargs = {**kwargs, "headers": {**AUTH, **kwargs.get("headers", {})}}
    if callable(kwargs.get("content")):  # a generator can be sent only once: make it per run
        kwargs["content"] = kwargs["content"](2 * MAX_BYTES)
    r = http.post("/v1/judge", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert post(http, "/v1/judge", GOOD).status_code == 200


def test_error_details_name_the_problem(http):
    blank = post(http, "/v1/judge", {**GOOD, "response_b": " "}).json()["detail"]
    assert blank == "answer_b: empty"
    long_prompt = post(http, "/v1/judge", {**GOOD, "question": "seven " * 5000}).json()["detail"]
    assert "limits.max_prompt_tokens" in long_prompt
    too_many = post(http, "/v1/rank", {"question": "q", "responses": list("abcde")})
    assert too_many.status_code == 422 and "limits.max_rank_responses" in too_many.json()["detail"]


def test_client(url):
    with JudgeClient(url, api_key=KEY, timeout=60, retries=1) as client:
        assert client.ready()
        result = client.judge("4", "5", question="2 + 2?", both_orders=True)
        assert result["winner"] in ("A", "B", "inconsistent", "none") and result["swapped"]["order"] == "BA"
        ranked = client.rank(["4", "5", "four"], question="2 + 2?", method="knockout")
        assert len(ranked["ranking"]) == 3
        assert client.model_info()["batching"]["prompts"] > 0
        with pytest.raises(JudgeClientError) as bad:
            client.judge("4", " ", question="2 + 2?")
        assert bad.value.status == 422 and bad.value.detail == "answer_b: empty"
    with JudgeClient(url, api_key="wrong", retries=3) as client, pytest.raises(JudgeClientError) as denied:
        client.model_info()
    assert denied.value.status == 401  # not retried: a client mistake
    with JudgeClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01) as client:
        with pytest.raises(JudgeClientError, match="gave up after 3 attempts; last: ConnectError"):
            client.model_info()
        assert not client.ready()


def test_verl_reward_function(url, monkeypatch):
    monkeypatch.setenv("RMR1_API_KEY", KEY)
    extra = {"question": "What is 2 + 3?"}
    reward = compute_score("test", "2 + 3 = 5.", "2 + 3 = 6.", extra, base_url=url)
    # Greedy decoding: the reward is the one the same judgement implies.
    with JudgeClient(url, api_key=KEY) as client:
        winner = client.judge("2 + 3 = 5.", "2 + 3 = 6.", question="What is 2 + 3?", both_orders=True)["winner"]
    assert reward == {"A": 1.0, "B": -1.0}.get(winner, 0.0)
    assert compute_score("test", "   ", "2 + 3 = 6.", extra, base_url=url) == -1.0  # nothing to judge: a loss
    rewards = compute_score_batch(
        ["test"] * 3, ["5", "6", "five"], [None] * 3, [{**extra, "reference": "2 + 3 = 6."}] * 3, base_url=url
    )
    assert len(rewards) == 3 and set(rewards) <= {1.0, -1.0, 0.0}


def test_openai_chat_completions(http, url):
    listed = http.get("/v1/models", headers=AUTH).json()
    served = listed["data"][0]["id"]
    assert listed["object"] == "list" and len(listed["data"]) == 1 and served.endswith("model")  # model.path
    body = {"model": served, "max_tokens": 8, "temperature": 0, "user": "ignored-field",
            "messages": [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "2 + 3?"}]}
    first, again = post(http, "/v1/chat/completions", body), post(http, "/v1/chat/completions", body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["object"] == "chat.completion" and out["model"] == served and out["id"].startswith("chatcmpl-")
    choice, usage = out["choices"][0], out["usage"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert 1 <= usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == 8 else "stop")
    assert again.json()["choices"][0]["message"] == choice["message"]  # greedy: the same text

    assert post(http, "/v1/chat/completions", {**body, "model": "gpt-4o"}).status_code == 404
    assert post(http, "/v1/chat/completions", {**body, "stream": True}).status_code == 422
    assert post(http, "/v1/chat/completions", {**body, "max_tokens": 33}).status_code == 422  # over limits
    assert post(http, "/v1/chat/completions", {**body, "messages": []}).status_code == 422
    assert post(http, "/v1/chat/completions", body, headers={}).status_code == 401


def test_the_judge_service_is_a_teacher_for_chains(url, http, tmp_path):
    """`rmr1 chains` with this Serve app as its OpenAI-compatible teacher: every row is answered in
    pass 1, and the tiny judge's wrong chains go back with their label in pass 2."""
    served = http.get("/v1/models", headers=AUTH).json()["data"][0]["id"]
    data, out = tmp_path / "prompts.parquet", tmp_path / "chains"
    write_prompt_rows(data, 4, seed=0)
    code = generate_chains.main([
        f"teacher.base_url={url}/v1", f"teacher.model={served}", f"teacher.api_key_env={KEY_ENV}",
        "teacher.max_tokens=16", "teacher.temperature=1.0", f"input_path={data}", f"output_dir={out}",
        "concurrency=4",
    ])
    stats = json.loads((out / "stats.json").read_text())
    print("per-pass stats with the Serve judge as teacher:", json.dumps(stats["passes"]), stats["requests"])
    assert code == 0
    first, second = stats["passes"]["1"], stats["passes"]["2"]
    assert first["sent"] == first["answered"] == 4 and first["failed"] == 0
    assert 1 <= first["completion_tokens"] <= 4 * 16 and first["prompt_tokens"] > 4 * 100
    assert second["sent"] == 4 - first["kept"] and second["answered"] == second["sent"]
    assert stats["rows"]["kept"] + stats["rows"]["rejected"] == 4 and stats["requests"]["failed"] == 0
