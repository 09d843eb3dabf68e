"""Joint training on an embedded real dataset, and the weak view's starvation in numbers.

Run: python examples/train_joint.py
"""

import modaldiag as md


def main(epochs: int = 15) -> dict:
    data = md.datasets.load("mfeat-fou-pix")
    model = md.models.default_model(data, fusion="concat")
    train, val, test = data.loaders(batch_size=64)
    history = md.fit(model, train, val_loader=val, epochs=epochs, progress=False)
    scores = md.unimodal_scores(model, test)
    result = {m: round(s.accuracy, 3) for m, s in scores.items()}
    print(f"best epoch {history.best_epoch}; unimodal test accuracy inside the joint model: {result}")
    return result


if __name__ == "__main__":
    main()
