"""DETR's matcher and set criterion: brute-force optimal assignments, and equality with transformers' port of
facebookresearch/detr (transformers.loss.loss_for_object_detection) on the same random inputs."""
import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from finetune.detr.criterion import SetCriterion
from finetune.detr.matcher import HungarianMatcher

ref = pytest.importorskip("transformers.loss.loss_for_object_detection")


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] valid normalised cxcywh boxes."""
    cxcy = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([cxcy, wh], dim=1)


def random_case(batch: int, queries: int, classes: int, counts: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes + 1, generator=g)
    boxes = torch.sigmoid(torch.randn(batch, queries, 4, generator=g))
    targets = [{"labels": torch.randint(0, classes, (n,), generator=g), "boxes": random_boxes(n, g)} for n in counts]
    return logits, boxes, targets


def brute_force_cost(cost: torch.Tensor) -> float:
    """The least total cost of a one-to-one assignment of all targets (columns) to distinct queries (rows)."""
    queries, num_targets = cost.shape
    if num_targets == 0:
        return 0.0
    return min(sum(cost[q, t].item() for t, q in enumerate(rows))
               for rows in itertools.permutations(range(queries), num_targets))


@pytest.mark.parametrize("counts", [[3, 0, 5], [1, 4, 2], [0, 0, 0], [5, 5, 1]])
def test_matcher_equals_brute_force(counts):
    logits, boxes, targets = random_case(3, 6, 4, counts, seed=sum(counts))
    matcher = HungarianMatcher()
    costs = matcher.cost_matrices(logits, boxes, targets)
    matches = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for b, ((rows, cols), cost, n) in enumerate(zip(matches, costs, counts)):
        assert len(rows) == len(cols) == n and len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))
        assert cost[rows, cols].sum().item() == pytest.approx(brute_force_cost(cost), abs=1e-5)
        # the cost is DETR's: 1 x -p(class) + 5 x L1 + 2 x -GIoU
        t = targets[b]
        if n:
            prob = logits[b].softmax(-1)
            expect = (-prob[:, t["labels"]] + 5 * torch.cdist(boxes[b], t["boxes"], p=1)
                      - 2 * generalized_box_iou(box_convert(boxes[b], "cxcywh", "xyxy"),
                                                box_convert(t["boxes"], "cxcywh", "xyxy")))
            torch.testing.assert_close(cost, expect)


def test_matcher_equals_transformers():
    logits, boxes, targets = random_case(4, 10, 3, [2, 0, 7, 10], seed=1)
    ours = HungarianMatcher(1, 5, 2)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    theirs = ref.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)(
        {"logits": logits, "pred_boxes": boxes}, [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets])
    for (r1, c1), (r2, c2) in zip(ours, theirs):
        assert r1.tolist() == r2.tolist() and c1.tolist() == c2.tolist()


def test_criterion_equals_transformers_with_aux_losses():
    layers, classes = 3, 5
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(layers, 3, 8, classes + 1, generator=g, requires_grad=True)
    boxes = torch.sigmoid(torch.randn(layers, 3, 8, 4, generator=g)).requires_grad_(True)
    _, _, targets = random_case(3, 8, classes, [4, 0, 6], seed=4)
    aux = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(layers - 1)]
    criterion = SetCriterion(classes, HungarianMatcher(1, 5, 2), eos_coef=0.1)
    ours = criterion({"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}, targets)

    loss_ref = ref.ImageLoss(ref.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2), num_classes=classes,
                             eos_coef=0.1, losses=["labels", "boxes", "cardinality"])
    theirs = loss_ref({"logits": logits[-1], "pred_boxes": boxes[-1],
                       "auxiliary_outputs": [{"logits": a["pred_logits"], "pred_boxes": a["pred_boxes"]} for a in aux]},
                      [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets])
    expected_keys = {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error"} | {
        f"{k}_{i}" for k in ("loss_ce", "loss_bbox", "loss_giou") for i in range(layers - 1)}
    assert expected_keys <= set(theirs) and expected_keys <= set(ours) and "class_error" in ours
    for key in expected_keys:
        torch.testing.assert_close(ours[key], torch.as_tensor(theirs[key]).reshape(ours[key].shape), atol=1e-6,
                                   rtol=1e-6, msg=key)
    # the total is transformers' weighting (ForObjectDetectionLoss: 1 / 5 / 2 on every layer)
    weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    total_ref = sum(theirs[k] * weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] for k in expected_keys
                    if k != "cardinality_error")
    total = criterion.total(ours)
    torch.testing.assert_close(total, total_ref)
    total.backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad[0].abs().sum() > 0  # the aux layers get gradients


def test_class_error_and_cardinality_of_perfect_predictions():
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    logits = torch.full((2, 4, 3), -20.0)
    logits[:, :, 2] = 20.0                        # no-object everywhere...
    logits[0, 1, 2], logits[0, 1, 1] = -20.0, 20.0  # ...except the two queries that hold the targets
    logits[0, 3, 2], logits[0, 3, 0] = -20.0, 20.0
    boxes = torch.full((2, 4, 4), 0.5)
    boxes[0, 1], boxes[0, 3] = targets[0]["boxes"]
    losses = SetCriterion(2, HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["class_error"].item() == 0 and losses["cardinality_error"].item() == 0
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6) and losses["loss_giou"].item() == pytest.approx(
        0, abs=1e-6) and losses["loss_ce"].item() < 1e-6
