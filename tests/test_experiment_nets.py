"""The shapes benchmark's flow wrapper: the noise_skip path v = net(x, t, tokens) + a(t) x (mdt.experiments.nets)."""
import torch

from mdt.experiments.nets import ss_flow


def test_noise_skip_starts_as_the_plain_flow_and_adds_a_per_channel_multiple_of_x():
    torch.manual_seed(0)
    x, t = torch.randn(2, 8, 16, 16, 16), torch.tensor([100.0, 900.0])
    cond = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    plain, skip = ss_flow(3, model_channels=32, num_blocks=1), ss_flow(3, model_channels=32, num_blocks=1,
                                                                        noise_skip=True)
    skip.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(skip(x, t, cond), plain(x, t, cond))          # a(t) = 0 at initialisation
        a = torch.tensor([0.5, -1.0, 0, 0, 0, 0, 2.0, 0])
        skip.skip[-1].bias.copy_(a)                                      # a(t) = a for every t
        expected = plain(x, t, cond) + a.view(1, 8, 1, 1, 1) * x
        assert torch.allclose(skip(x, t, cond), expected, atol=1e-6)
