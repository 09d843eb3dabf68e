"""InfoReg in a plain PyTorch training loop: four added lines (marked +).

Run: python examples/plain_loop.py
"""

import torch
import torch.nn.functional as F

import modaldiag as md


def main(epochs: int = 10) -> dict:
    data = md.datasets.load("mfeat-fou-pix")
    torch.manual_seed(0)
    model = md.models.default_model(data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    train_loader = data.train.loader(64, shuffle=True)

    run = md.Regulation(model, optimizer, md.InfoReg(), monitor=True)  # +
    for epoch in range(epochs):
        loader = run.epoch_start(epoch, train_loader)                     # +
        for inputs, labels in loader:
            optimizer.zero_grad()
            run.backward(inputs, labels)                                  # + (was: F.cross_entropy(model(inputs), labels).backward())
            optimizer.step()
        logs = run.epoch_end()                                            # +
        print(f"epoch {epoch}: window {logs['regulator']['window_open']}, "
              f"alpha {({m: round(a, 2) for m, a in logs['regulator']['alpha'].items()})}")

    model.eval()
    with torch.no_grad():
        test_loss = F.cross_entropy(model(data.test.inputs), data.test.labels).item()
    scores = md.unimodal_scores(model, data.test.loader(400))
    result = {m: round(s.accuracy, 3) for m, s in scores.items()}
    print(f"test loss {test_loss:.3f}; unimodal accuracy {result}")
    return result


if __name__ == "__main__":
    main()
