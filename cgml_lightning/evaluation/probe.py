"""Downstream probe: linear-probe accuracy on frozen encoder features.

The features of an input x are the module's own `probe_features(x)`: what its generator summarises of x (the
U-Net's pooled bottleneck, the MLP's hidden layer; the flow's velocity net at t = 0). A logistic regression
(scikit-learn, on standardised features) is fitted on the training split's features and scored on the test split's.
"""
from __future__ import annotations

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor
from torch.utils.data import DataLoader



def encoder_features(module, x: Tensor) -> Tensor:
    """Frozen encoder features of inputs x: [B, F] (the averaged weights where the module keeps an EMA)."""
    with module.averaged_weights():
        return module.probe_features(x)


@torch.no_grad()
def split_features(module, datamodule, split: str, max_samples: int) -> tuple[Tensor, Tensor]:
    """(features [n, F], labels [n]) of the first max_samples inputs of a split, in the split's order."""
    datamodule.setup()
    data = datamodule.splits[split]
    if getattr(data, "label", None) is None:
        raise ValueError(f"linear probe: {type(datamodule).__name__} has no class labels ('label' in its batches)")
    was_training = module.training
    module.eval()
    feats, labels, seen = [], [], 0
    try:
        for batch in DataLoader(data, batch_size=datamodule.eval_batch_size, shuffle=False,
                                collate_fn=getattr(datamodule, "collate", None)):
            x = batch["x"][: max_samples - seen]
            feats.append(encoder_features(module, x.to(module.device)).cpu())
            labels.append(batch["label"][: len(x)])
            seen += len(x)
            if seen >= max_samples:
                break
    finally:
        module.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def linear_probe_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                          max_iter: int = 1000, seed: int = 0) -> float:
    """Accuracy on the test features of a logistic regression fitted on the training features."""
    if len(torch.unique(train_labels)) < 2:
        raise ValueError(f"linear probe: the training features hold {len(torch.unique(train_labels))} class; need 2+")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    probe.fit(train_features.double().numpy(), train_labels.numpy())
    return float(probe.score(test_features.double().numpy(), test_labels.numpy()))


def linear_probe(module, datamodule, num_train: int = 2000, num_test: int = 1000, seed: int = 0) -> float:
    """Linear-probe accuracy of a module's frozen encoder: fitted on num_train training inputs, scored on num_test
    test inputs (the datamodule's class labels)."""
    train = split_features(module, datamodule, "train", num_train)
    test = split_features(module, datamodule, "test", num_test)
    return linear_probe_accuracy(*train, *test, seed=seed)
