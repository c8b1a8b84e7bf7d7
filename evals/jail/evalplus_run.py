"""In the sandbox: call one function on each input and send each output out as plain data.

Payload (one part): code, entry_point, dataset ("humaneval" | "mbpp"), task_no, inputs, copy_inputs,
hash_over, float_hash_over. Lines out: {"loaded": true} once the code ran, then per input
{"t": call seconds, "te": encoding seconds} + the output's plain-data text (or "sha" in the header
instead, for text longer than hash_over, or float_hash_over when it holds a float), or
{"raised": "<exception>"}. This program judges nothing: the grader compares outside.
"""

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from channel import not_dumpable, open_results, read_part
from mbpp_inputs import NOT_NONE_TASKS, decode_inputs
from plain import wire


def main():
    not_dumpable()
    payload = read_part()
    _, send = open_results()
    sys.set_int_max_str_digits(0)
    inputs = payload["inputs"]
    if payload["dataset"] == "mbpp":
        inputs = [decode_inputs(payload["task_no"], args) for args in inputs]
    not_none = payload["dataset"] == "mbpp" and payload["entry_point"] in NOT_NONE_TASKS
    try:
        namespace = {"__name__": "__main__"}
        exec(compile(payload["code"], "solution.py", "exec"), namespace)
        fn = namespace[payload["entry_point"]]
    except BaseException as e:
        return send({"error": f"loading the program: {type(e).__name__}: {e}"[:500]})
    send({"loaded": True})
    for args in inputs:
        if payload["copy_inputs"]:
            args = copy.deepcopy(args)
        start = time.perf_counter()
        try:
            out = fn(*args)
            seconds = time.perf_counter() - start
            if not_none and type(out) is not bool:
                out = out is not None
            text, sha, _ = wire(out, payload["hash_over"], payload["float_hash_over"])
        except BaseException as e:  # the candidate's error, or an output that would not encode
            send({"raised": f"{type(e).__name__}: {e}"[:300]})
            continue
        times = {"t": seconds, "te": time.perf_counter() - start - seconds}
        if sha:
            send({**times, "sha": sha})
        else:
            send(times, text)


if __name__ == "__main__":
    main()
    os._exit(0)  # the candidate's leftover threads or atexit hooks must not hold the slot
