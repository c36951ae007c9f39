"""End to end, for real: ./model start -> real llama-server router -> real gemma model ->
the real openai client and curl on our port -> ./model stop leaves no process behind."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import Env, llama_servers_under

MODEL = "ls/gemma-3:270m-q4_k_m"


def test_openai_client_lists_and_chats(stack: Env) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused")
    listed = client.models.list()
    names = {m.id for m in listed.data} | {a for m in listed.data
                                           for a in (getattr(m, "aliases", None) or [])}
    assert MODEL in names

    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0

    chunks = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16,
        stream=True)
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "a streamed reply arrives in several pieces"

    # The dash form older clients use reaches the same model.
    dashed = client.chat.completions.create(
        model=MODEL.replace(":", "-"), messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert dashed.choices[0].message.content is not None


def test_one_name_everywhere(stack: Env) -> None:
    """Every command shows the name `list` shows (the colon form), and takes either form."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=2)
    listed = [m["name"] for m in json.loads(stack.run("list", "--json").stdout)]
    served = json.loads(stack.run("list", "--served", "--json").stdout)
    stats = json.loads(stack.run("stats", "--json").stdout)["models"]
    assert listed == [MODEL] == [m["name"] for m in served] == [m["name"] for m in stats]
    assert served[0]["engine_id"] == MODEL.replace(":", "-")  # the router's own id
    assert MODEL in stack.run("stats").stdout and MODEL in stack.run("list", "--served").stdout
    assert json.loads(stack.run("show", MODEL, "--json").stdout)["name"] == MODEL
    unloaded = stack.run("unload", MODEL)  # the colon form reaches the router's model
    assert unloaded.returncode == 0 and f"unloaded: {MODEL}" in unloaded.stdout
    dashed = stack.run("unload", MODEL.replace(":", "-"))  # the dash form stays accepted
    assert dashed.returncode == 0 and f"{MODEL} was not loaded" in dashed.stdout


def test_curl_gets_a_completion(stack: Env) -> None:
    body = json.dumps({"model": MODEL, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "Hi"}]})
    out = subprocess.run(["curl", "-sf", f"{stack.base_url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["choices"][0]["message"]["role"] == "assistant"


def test_status_start_twice_and_stop(stack: Env) -> None:
    status = stack.run("status", "--json")
    assert status.returncode == 0
    data = json.loads(status.stdout)
    assert data["running"] and data["healthy"] and data["engine"] == "llama-server"
    assert data["children"]["engine"]["state"] == "running"

    again = stack.run("start")
    assert again.returncode == 0 and "already running" in again.stdout
    assert f"pid {data['pid']}" in again.stdout

    # Load the model, so stop has a per-model llama-server to clean up.
    from openai import OpenAI

    OpenAI(base_url=f"{stack.base_url}/v1", api_key="x").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert len(llama_servers_under(stack.home.parent)) >= 2  # router + the model's server

    stopped = stack.run("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert llama_servers_under(stack.home.parent) == []
    after = stack.run("status")
    assert after.returncode == 3 and "not running" in after.stdout
