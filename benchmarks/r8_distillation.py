"""Distillation on Reuters R8: how much of the gap between a student trained from scratch
and the transformer teacher does the ``distill`` stage close?

The teacher (``experiments/r8_transformer.gin``'s transformer: 2 blocks, embed 64, 2
epochs, Adam 0.0005, batch 32) is trained once and exported. Each student is trained
twice per seed from the same initial weights and data order, behind the same tokenizer:
on the labels alone, and with the ``distill`` stage. The fraction of the gap closed is
(distilled - scratch) / (teacher - scratch), of the means over seeds; there is no gap to
close where the student from scratch is at least as good as the teacher.

    python benchmarks/r8_distillation.py [--students NAME ...] [--seeds 3]

Prints a table and writes benchmarks/results/r8_distillation.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness import adam_training, machine, scratch_and_distilled, train_teacher, write_result

from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.text import load_reuters
from lmt_tf.data.tokenization import Tokenizer
from lmt_tf.models.transformer import build_bag_of_embeddings, build_transformer
from lmt_tf.stages.distill import Distill

if TYPE_CHECKING:  # imported by harness, after lmt_tf has selected tf-keras
    import tf_keras as keras

TEACHER_EPOCHS, TEACHER_RATE = 2, 0.0005  # as experiments/r8_transformer.gin trains it
BATCH = 32  # documents a step, teacher and students


@dataclass(frozen=True)
class Student:
    """One student and how it is trained (the same for scratch and distilled)."""

    name: str
    kind: str  # bag: build_bag_of_embeddings; transformer: one block
    embed_dim: int
    learning_rate: float
    epochs: int
    alpha: float
    temperature: float

    def build(self, **kwargs) -> keras.Model:
        if self.kind == "bag":
            return build_bag_of_embeddings(embed_dim=self.embed_dim, dropout=0.1, **kwargs)
        return build_transformer(embed_dim=self.embed_dim, num_heads=4, num_blocks=1,
                                 ff_dim=2 * self.embed_dim, dropout=0.1, **kwargs)


STUDENTS = {s.name: s for s in [
    # Held to the teacher's rate and about its epochs: the bag of embeddings underfits.
    Student("bag16-teacher-rate", "bag", 16, 0.0005, 3, 0.1, 10.0),
    # At a rate that suits it (10x the transformer's) the bag learns R8 on its own.
    Student("bag64", "bag", 64, 0.005, 3, 0.1, 1.0),
    Student("bag16", "bag", 16, 0.005, 3, 0.1, 1.0),
    # One block of embed 32 (the teacher: two of 64), the teacher's rate and epochs.
    Student("transformer32", "transformer", 32, 0.0005, 2, 0.5, 2.0),
]}


def teacher_model(**kwargs) -> keras.Model:
    return build_transformer(embed_dim=64, num_heads=4, num_blocks=2, ff_dim=128,
                             dropout=0.1, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="*", default=list(STUDENTS),
                        choices=list(STUDENTS))
    parser.add_argument("--seeds", type=int, default=3, help="student seeds (teacher: 0)")
    parser.add_argument("--output", default="r8_distillation.json",
                        help="file name under benchmarks/results/")
    args = parser.parse_args()
    splits = load_reuters()
    words = Preprocessing(tokenizer=Tokenizer(vocabulary_size=20000, sequence_length=256))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher_accuracy, teacher_path = train_teacher(
            work, teacher_model, splits, adam_training(TEACHER_EPOCHS, BATCH, TEACHER_RATE),
            words)
        for name in args.students:
            student = STUDENTS[name]
            start = time.perf_counter()
            seeds = [scratch_and_distilled(
                work, student.build, Distill(teacher=teacher_path, alpha=student.alpha,
                                             temperature=student.temperature,
                                             epochs=student.epochs),
                seed, splits, adam_training(student.epochs, BATCH, student.learning_rate),
                words, name) for seed in range(args.seeds)]
            s = statistics.mean(r["scratch"] for r in seeds)
            d = statistics.mean(r["distilled"] for r in seeds)
            gap = teacher_accuracy - s
            rows.append({**asdict(student), "per_seed": seeds, "scratch_mean": s,
                         "distilled_mean": d,
                         "gap_closed": (d - s) / gap if gap > 0 else None,
                         "seconds": time.perf_counter() - start})
    result = {
        "machine": machine(),
        "setup": {"teacher": f"build_transformer (2 blocks, embed 64), {TEACHER_EPOCHS} "
                             f"epochs, Adam {TEACHER_RATE}, batch 32",
                  "tokenizer": "words, vocabulary 20,000, 256 tokens",
                  "data": "Reuters R8 4,937/548/2,189", "teacher_seed": 0,
                  "student_seeds": args.seeds},
        "teacher_test_accuracy": teacher_accuracy,
        "students": rows,
    }
    print(f"{'student (mean of seeds)':<24}{'scratch':>10}{'distilled':>11}{'gap closed':>12}")
    for row in rows:
        closed = f"{row['gap_closed']:.0%}" if row["gap_closed"] is not None else "no gap"
        print(f"{row['name']:<24}{row['scratch_mean']:>10.4f}{row['distilled_mean']:>11.4f}"
              f"{closed:>12}")
    write_result(args.output, result, indent=2)


if __name__ == "__main__":
    main()
