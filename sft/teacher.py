"""The teacher side of KD: loading an in-process teacher (kd: online, feature / attention alignment) and checking that the student's tokenizer
is the teacher's (both KD modes compare distributions token id by token id)."""

import logging

from data.config import ConfigError

log = logging.getLogger(__name__)


def load_teacher(name: str, student_tokenizer, dtype, setting: str = "teacher_model"):
    """An in-process teacher (kd: online, feature and attention alignment), from a model directory or hub name, in
    `dtype` (the student's); `setting` is the config field that named it."""
    from transformers import AutoModelForCausalLM

    check_same_tokenizer(student_tokenizer, name, setting)
    try:
        teacher = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise ConfigError(f"{setting}: cannot load {name!r}: {e}") from None
    log.info("online KD teacher: %s (%s parameters)", name, f"{teacher.num_parameters():,}")
    return teacher


def check_same_tokenizer(student_tokenizer, teacher, name: str = "teacher_model") -> None:
    """Refuse a student whose vocabulary (token -> id) or special tokens differ from the teacher's: KD compares
    distributions id by id. `teacher` is a tokenizer or a path/name AutoTokenizer can load."""
    if isinstance(teacher, str) or hasattr(teacher, "__fspath__"):
        from transformers import AutoTokenizer

        try:
            teacher = AutoTokenizer.from_pretrained(str(teacher))
        except OSError as e:  # e.g. the served name a server reported, not a loadable path or hub id
            raise ConfigError(f"{name}: cannot load the teacher's tokenizer from {str(teacher)!r} ({e}); set "
                              f"{name} to the teacher's model directory or hub name") from None
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher.get_vocab()
    problems = []
    if student_vocab != teacher_vocab:
        differ = sorted((t for t in student_vocab.keys() & teacher_vocab.keys() if student_vocab[t] != teacher_vocab[t]),
                        key=student_vocab.get)
        only_student = sorted(student_vocab.keys() - teacher_vocab.keys(), key=student_vocab.get)
        only_teacher = sorted(teacher_vocab.keys() - student_vocab.keys(), key=teacher_vocab.get)
        problems.append(f"vocabularies differ (student {len(student_vocab)} tokens, teacher {len(teacher_vocab)})")
        if differ:
            problems.append(f"{len(differ)} tokens have other ids, e.g. "
                            + ", ".join(f"{t!r}: {student_vocab[t]} vs {teacher_vocab[t]}" for t in differ[:5]))
        if only_student:
            problems.append(f"{len(only_student)} only in the student, e.g. {only_student[:5]}")
        if only_teacher:
            problems.append(f"{len(only_teacher)} only in the teacher, e.g. {only_teacher[:5]}")
    student_special, teacher_special = _special_tokens(student_tokenizer), _special_tokens(teacher)
    if student_special != teacher_special:
        problems.append(f"special tokens differ: student {student_special}, teacher {teacher_special}")
    if problems:
        raise ConfigError(f"{name}: the student's tokenizer is not the teacher's ({teacher.name_or_path}), so its "
                          "token ids do not name the teacher's tokens: " + "; ".join(problems)
                          + ". Logit KD needs a student from the teacher's tokenizer family (or kd: none).")


def _special_tokens(tokenizer) -> dict[str, int]:
    return {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
