"""Losses on seeded tensors, checked against explicit computations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blsp.losses import ForwardKLLoss, TopKKLLoss, correction_penalty
from blsp.readers.ctc import EmbeddingCTCHead


def test_kl_of_identical_distributions_is_zero():
    x = torch.randn(7, 11, generator=torch.Generator().manual_seed(0))
    assert ForwardKLLoss()(x, x.clone()).item() == 0.0


def test_kl_matches_the_definition_and_does_not_depend_on_chunking():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(9, 13, generator=g), torch.randn(9, 13, generator=g)
    p, q = teacher.softmax(-1), student.softmax(-1)
    expected = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(ForwardKLLoss()(student, teacher), expected)
    torch.testing.assert_close(ForwardKLLoss(chunk=2)(student, teacher), expected)
    t = 2.0
    p2, q2 = (teacher / t).softmax(-1), (student / t).softmax(-1)
    torch.testing.assert_close(ForwardKLLoss(temperature=t)(student, teacher), (p2 * (p2.log() - q2.log())).sum() * t * t)


def test_kl_gradient_reaches_only_the_student():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(4, 6, generator=g, requires_grad=True)
    ForwardKLLoss()(student, torch.randn(4, 6, generator=g)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_ctc_head_equals_torch_ctc_on_explicit_logits():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(50, 8, generator=g)
    head = EmbeddingCTCHead(emb, vocab=[3, 7, 9, 20])
    x = torch.randn(2, 6, 8, generator=g)
    targets = [head.targets([7, 7, 20]), head.targets([3])]
    assert targets == [[2, 2, 4], [1]]
    lengths = torch.tensor([6, 4])
    table = torch.cat([torch.zeros(1, 8), emb[[3, 7, 9, 20]]])
    log_probs = F.log_softmax(x @ table.T, -1).transpose(0, 1)
    expected = F.ctc_loss(log_probs, torch.tensor([2, 2, 4, 1]), lengths, torch.tensor([3, 1]), reduction="sum") / 4
    torch.testing.assert_close(head.loss(x, lengths, targets), expected)


def test_ctc_head_logits_and_gradients_are_scale_times_the_product_with_blank_and_rows_plus_bias():
    # forward() is arranged for speed; this is the definition it must keep, gradients included
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(40, 6, generator=g)
    head = EmbeddingCTCHead(emb, vocab=[2, 5, 11])
    with torch.no_grad():
        head.blank.copy_(torch.randn(6, generator=g)), head.scale.fill_(2.5), head.bias.copy_(torch.randn(4, generator=g))
    x = torch.randn(3, 5, 6, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    blank, scale, bias = (p.detach().clone().requires_grad_() for p in (head.blank, head.scale, head.bias))
    expected = scale * (x_ref @ torch.cat([blank[None], emb[[2, 5, 11]]]).T) + bias
    torch.testing.assert_close(head(x), expected)
    weights = torch.randn(3, 5, 4, generator=g)
    (head(x) * weights).sum().backward(), (expected * weights).sum().backward()
    for got, want in ((x.grad, x_ref.grad), (head.blank.grad, blank.grad), (head.scale.grad, scale.grad),
                      (head.bias.grad, bias.grad)):
        torch.testing.assert_close(got, want)


def test_ctc_head_scores_speech_that_sits_on_the_word_embeddings_best():
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(30, 16, generator=g) * 3
    head = EmbeddingCTCHead(emb, vocab=list(range(30)))
    words = [5, 12, 7]
    on_words = torch.stack([emb[w] for w in words for _ in range(2)])[None]  # each word held 2 frames
    random = torch.randn(1, 6, 16, generator=g) * 3
    lengths, targets = torch.tensor([6]), [head.targets(words)]
    assert head.loss(on_words, lengths, targets) < 0.2 * head.loss(random, lengths, targets)


def test_ctc_head_targets_skip_tokens_outside_its_vocabulary():
    head = EmbeddingCTCHead(torch.randn(30, 4), vocab=[3, 7, 9])
    assert head.targets([7, 5, 9]) == [2, 3]  # 5 is not in the head's vocabulary


def test_top_k_kl_is_the_full_kl_when_k_is_the_vocabulary_and_the_renormalised_one_below():
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    for t in (1.0, 2.0):
        logprobs, ids = F.log_softmax(teacher, dim=-1).topk(10, dim=-1)  # every token: exactly the KL
        torch.testing.assert_close(TopKKLLoss(t, chunk=4)(student, ids, logprobs), ForwardKLLoss(t)(student, teacher))
    logprobs, ids = F.log_softmax(teacher, dim=-1).topk(3, dim=-1)
    p = logprobs.softmax(-1)  # the teacher renormalised over its top 3; the student read at those tokens
    q = F.log_softmax(student, dim=-1).gather(-1, ids)
    torch.testing.assert_close(TopKKLLoss()(student, ids, logprobs), (p * (p.log() - q)).sum())


def test_correction_penalty_is_each_clips_mean_squared_norm_over_the_embedding_scale_per_target_token():
    g = torch.Generator().manual_seed(5)
    vectors, lengths = torch.randn(2, 4, 3, generator=g), torch.tensor([4, 2])
    padded = vectors.clone()
    padded[1, 2:] = 100.0  # past the clip's length: not a correction the LLM reads
    first = vectors[0].pow(2).sum(-1).mean()
    second = vectors[1, :2].pow(2).sum(-1).mean()
    expected = (first * 5 + second * 7) / 2.5
    torch.testing.assert_close(correction_penalty(padded, lengths, [5, 7], 2.5), expected)
    assert correction_penalty(torch.zeros(2, 4, 3), lengths, [5, 7], 2.5).item() == 0.0
    # a clip with no vector costs nothing (and no division by zero)
    assert correction_penalty(vectors, torch.tensor([0, 0]), [5, 7], 1.0).item() == 0.0
