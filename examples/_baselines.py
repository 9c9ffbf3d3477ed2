"""The linear baseline every reported accuracy stands beside: TF-IDF + logistic regression.

Word 1-2-grams and character 1-4-grams (within word boundaries), C chosen on the validation
split by macro-F1 (Ridge and validation MSE for a regression target). The features are fitted
once on the training texts; only the regulariser moves with C. benchmarks/quality.py and the
examples use this one function, so a baseline in the docs is the same model everywhere.
"""

from __future__ import annotations

import numpy as np

from llmtune import DatasetAdapter

STRENGTHS = (0.1, 0.3, 1, 3, 10, 30, 100)


def tfidf_lr(train: DatasetAdapter, val: DatasetAdapter, test: DatasetAdapter) -> dict[str, float]:
    """Test scores of the C that does best on validation: accuracy and macro-F1, or MSE and MAE."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_union

    texts = [list(d.dataset["text"]) for d in (train, val, test)]
    y, yv, yt = (np.asarray(d.dataset["label"]) for d in (train, val, test))
    features = make_union(
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True),
    )
    x = features.fit_transform(texts[0])
    xv, xt = features.transform(texts[1]), features.transform(texts[2])
    regression = train.task == "regression"
    best = None
    for c in STRENGTHS:
        head = Ridge(alpha=1 / c) if regression else LogisticRegression(C=c, max_iter=2000)
        head.fit(x, y)
        predicted = head.predict(xv)
        score = -np.mean((predicted - yv) ** 2) if regression else f1_score(yv, predicted, average="macro")
        if best is None or score > best[0]:
            best = (score, c, head)
    _, c, head = best
    predicted = head.predict(xt)
    if regression:
        return {
            "mse": float(np.mean((predicted - yt) ** 2)),
            "mae": float(np.mean(np.abs(predicted - yt))),
            "C": c,
        }
    return {
        "accuracy": float(np.mean(predicted == yt)),
        "f1": float(f1_score(yt, predicted, average="macro")),
        "C": c,
    }
