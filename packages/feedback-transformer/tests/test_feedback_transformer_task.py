"""An algorithmic task where feedback is what makes it solvable: the running parity of a
bit sequence (the paper's algorithmic tasks track a state through a sequence in the same
way, arXiv 2002.09402 section 4.1).

The memory holds only the last 2 steps, and the sequences are 12 long (far longer than the
2 layers): a Transformer-XL with that memory cannot see the bits beyond 2 steps back. The
Feedback Transformer can, because the memory of the previous step holds its top-layer
state, which carries the parity so far; it learns the task in a few dozen steps on the CPU,
and the learnt recurrence holds on sequences twice as long as the training ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from feedback_transformer import FeedbackTransformer


def test_running_parity_with_a_two_step_memory():
    torch.manual_seed(0)
    model = FeedbackTransformer(
        num_tokens=2, dim=32, depth=2, seq_len=1, mem_len=2, dim_head=16, heads=2
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        bits = torch.randint(0, 2, (32, 12), generator=generator)
        parity = bits.cumsum(dim=1) % 2
        loss = F.cross_entropy(model(bits).flatten(0, 1), parity.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.01:
            break
    assert losses[-1] < 0.05, f"loss after {len(losses)} steps: {losses[-1]:.3f}"

    model.eval()
    with torch.no_grad():
        bits = torch.randint(0, 2, (128, 24), generator=generator)
        accuracy = (model(bits).argmax(-1) == bits.cumsum(dim=1) % 2).float().mean()
    assert accuracy > 0.98, f"accuracy on 24-bit sequences: {accuracy:.3f}"
