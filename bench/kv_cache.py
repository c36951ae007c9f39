"""The next turn of a long conversation after its model was evicted (KV_CACHE, issue "memory
in the request path"): the saved conversation restored, against the prompt computed again,
against a model that was never evicted. All three sides run in one stack, round by round.

Each round starts from the same state: the model holds the conversation (its ~3,000-token
prompt and the reply), as after a turn. Then:
- never evicted: the next turn is sent as it is;
- restore: `POST /unload?model=` (which saves the slot), then the next turn (the front loads
  the model, restores the slot, forwards the turn);
- recompute: the same, with the saved slot deleted first, so the turn computes everything.
The model's own load time inside the restore turn is taken from the front's log (admission:
"<model> loaded in N ms") and reported apart. TTFT is taken from a streamed
`/v1/completions`, temperature 0.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from bench.harness import Goal, Outcome, Row, median, running_stack

MODEL = "ls/gemma-3:270m-q4_k_m"
ENGINE_ID = "ls/gemma-3-270m-q4_k_m"
CONVERSATION = "".join(f"Line {i}: the harbour master logs {i * 7} boats and {i} gulls.\n"
                       for i in range(130))  # about 3,000 tokens with gemma's tokenizer
NEXT_TURN = "Question: how many gulls on line 12? Answer:"
TOKENS = 16
SAVED_RE = re.compile(r"saved \d+ slot\(s\) of \S+ \((\d+) tokens, ([\d.]+) MiB\) in (\d+) ms")
RESTORED_RE = re.compile(r"restored (\d+) tokens of a saved conversation into \S+ in (\d+) ms")
LOADED_RE = re.compile(r"admission: \S+ loaded in (\d+) ms")


def _turn(base_url: str, prompt: str) -> tuple[float, float, str, dict[str, Any]]:
    """(TTFT s, total s, reply text, timings) of one streamed completion."""
    import requests

    from model_serve.sse import sse_payloads

    started = time.perf_counter()
    response = requests.post(f"{base_url}/v1/completions", stream=True, timeout=600, json={
        "model": MODEL, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "seed": 1,
        "stream": True})
    response.raise_for_status()
    first, text, timings = 0.0, "", {}
    for chunk in sse_payloads(response.iter_lines(chunk_size=None)):
        choices = chunk.get("choices") or []
        if choices and choices[0].get("text"):
            first = first or time.perf_counter()
            text += choices[0]["text"]
        timings = chunk.get("timings") or timings
    done = time.perf_counter()
    return (first or done) - started, done - started, text, timings


def _unload(base_url: str) -> None:
    import requests

    answer = requests.post(f"{base_url}/unload", params={"model": MODEL}, timeout=120)
    answer.raise_for_status()


def _folder(state: Path) -> Path:
    [folder] = [p for p in (state / "kv-cache").glob("*/*") if p.is_dir()]
    return folder


def run(root: Path, quick: bool) -> Outcome:
    rounds = 1 if quick else 3
    sides: dict[str, list[float]] = {"never_evicted": [], "restore": [], "recompute": [],
                                     "load": [], "rest": []}
    prompt_ms: dict[str, list[float]] = {"never_evicted": [], "restore": [], "recompute": []}
    same_reply: list[bool] = []
    cached: dict[str, list[int]] = {"never_evicted": [], "restore": [], "recompute": []}
    disk: list[int] = []
    turn_tokens: dict[str, int] = {}  # the next turn's prompt, in tokens, per side
    with running_stack(root, DEFAULT_CTX_SIZE="8192") as stack:
        url = stack.base_url
        _ttft, _total, reply, timings = _turn(url, CONVERSATION)
        prompt_tokens = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
        follow_up = CONVERSATION + reply + "\n" + NEXT_TURN

        def held(side: str) -> tuple[float, str]:
            """The conversation back in the model's memory, then the next turn on `side`."""
            _turn(url, CONVERSATION)  # the model holds prompt + reply (all but one token cached)
            if side != "never_evicted":
                _unload(url)
                newest = max(_folder(stack.state).glob("*.bin"), key=lambda p: p.stat().st_mtime)
                disk.append(newest.stat().st_size)
            if side == "recompute":
                for saved in _folder(stack.state).iterdir():
                    if saved.is_file():
                        saved.unlink()
            ttft, _total, text, timings = _turn(url, follow_up)
            cached[side].append(int(timings.get("cache_n", 0)))
            turn_tokens[side] = int(timings.get("cache_n", 0)) + int(timings.get("prompt_n", 0))
            prompt_ms[side].append(float(timings.get("prompt_ms", 0.0)))
            return ttft, text

        for _round in range(rounds):
            reference, text = held("never_evicted")
            sides["never_evicted"].append(reference)
            ttft, restored_text = held("restore")
            [load_ms] = LOADED_RE.findall(stack.log_lines(" loaded in ")[-1])
            sides["restore"].append(ttft)
            sides["load"].append(float(load_ms) / 1000)
            sides["rest"].append(ttft - float(load_ms) / 1000)
            same_reply.append(restored_text == text)
            sides["recompute"].append(held("recompute")[0])
        saves = [m.groups() for line in stack.log_lines("saved ")
                 if (m := SAVED_RE.search(line))]
        restores = [m.groups() for line in stack.log_lines("restored ")
                    if (m := RESTORED_RE.search(line))]
        shutil.rmtree(stack.state / "kv-cache", ignore_errors=True)

    restore, never, recompute, load, rest = (median(sides[k]) for k in (
        "restore", "never_evicted", "recompute", "load", "rest"))
    save_ms = [float(ms) for _tokens, _mib, ms in saves]
    restore_ms = [float(ms) for _tokens, ms in restores]
    outcome = Outcome(raw={
        "prompt_tokens": prompt_tokens, "ttft_s": sides, "cache_n": cached,
        "prompt_ms": prompt_ms, "next_turn_tokens": turn_tokens,
        "same_reply": same_reply, "saved_bytes": disk, "save_ms": save_ms,
        "restore_ms": restore_ms, "saves": [list(s) for s in saves],
    })
    outcome.rows += [
        Row(f"next turn after eviction, {prompt_tokens} tokens: whole turn, restore vs "
            "recompute (s)", restore, recompute, Goal("ratio", "<=", 0.2),
            note="load included in both"),
        Row("  the rest of the turn (restore TTFT - its load) vs never evicted (s)",
            rest, never, Goal("ratio", "<=", 1.5)),
        Row("  the model's own load time (s)", load),
        Row("  save of the slot (ms, median)", median(save_ms) if save_ms else None),
        Row("  restore of the slot (ms, median)", median(restore_ms) if restore_ms else None),
        Row("  saved conversation on disk (MiB)", median(disk) / 2**20 if disk else None),
        Row("  prompt tokens of the next turn from the restored cache (of all)",
            median(cached["restore"]), float(turn_tokens["restore"])),
        Row("  replies identical to never evicted (temperature 0)", float(sum(same_reply)),
            float(len(same_reply)), Goal("ratio", "==", 1.0)),
    ]
    outcome.notes.append("kv: " + json.dumps({k: [round(v, 3) for v in vals]
                                              for k, vals in sides.items()}))
    return outcome
