"""In the sandbox: call one function on each input and send each output out as plain data.

Payload (one part): code, entry_point, dataset ("humaneval" | "mbpp"), task_no, inputs, copy_inputs,
hash_over. Lines out: {"loaded": true} once the code ran, then per input {"t": seconds} + the output's
plain-data text ({"sha": ..., "len": ...} instead when it is longer than hash_over and holds no
float), or {"raised": "<exception>"}. This program judges nothing: the grader compares outside.
"""

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from channel import not_dumpable, open_results, read_part
from mbpp_inputs import NOT_NONE_TASKS, decode_inputs
from plain import digest, dumps


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
            text, floats = dumps(out)
        except BaseException as e:  # the candidate's error, or an output that is not plain data
            send({"raised": f"{type(e).__name__}: {e}"[:300]})
            continue
        if len(text) > payload["hash_over"] and not floats:
            send({"t": seconds, "sha": digest(text), "len": len(text)})
        else:
            send({"t": seconds}, text)


if __name__ == "__main__":
    main()
    os._exit(0)  # the candidate's leftover threads or atexit hooks must not hold the slot
