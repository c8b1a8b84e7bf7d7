"""MBPP+ stores tuples, sets and complex numbers as JSON lists/strings: restore them per task, as
evalplus does. Used inside the sandbox (before calling a function) and outside (for the oracles)."""

# re.Match results: evalplus keeps only whether they are None
NOT_NONE_TASKS = ("check_str", "text_match_three", "text_starta_endb")


def decode_inputs(task_no: int, args: list) -> list:
    def deep(x):
        return tuple(deep(i) for i in x) if isinstance(x, list) else x

    if task_no in (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596,
                   616, 630, 726, 740, 744, 809):  # fmt: skip
        return [tuple(a) for a in args]
    if task_no in (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780):
        return [[tuple(x) for x in a] for a in args]
    if task_no in (75, 413, 444, 753):
        return [[tuple(x) for x in args[0]], args[1]]
    if task_no in (106, 750):
        return [args[0], tuple(args[1])]
    if task_no == 115:  # an empty set was released as [] and is decoded as {} (a dict), as evalplus does
        return [[set(x) if isinstance(x, list) and x else {} for x in args[0]]]
    if task_no == 124:
        return [float(args[0]), complex(args[1])]
    if task_no in (250, 405, 446, 617, 720, 763, 808):
        return [tuple(args[0]), *args[1:]]
    if task_no in (259, 401, 445):
        return [tuple(tuple(x) for x in a) for a in args]
    if task_no == 278:
        return [tuple(tuple(x) if isinstance(x, list) else x for x in args[0])]
    if task_no == 307:
        return [tuple(args[0]), args[1], args[2]]
    if task_no == 722:
        return [{k: tuple(v) for k, v in args[0].items()}, *args[1:]]
    if task_no == 252:
        return [complex(args[0])]
    if task_no in (580, 615, 791):
        return list(deep(args))
    return args
