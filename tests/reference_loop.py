"""The federated round written the obvious way: one client after another, nn.Module and torch.optim.Adam.

The stacked engine in fedgan_utils must compute the same thing; tests/test_engine.py checks that it does.
"""
import copy

import torch
import torch.nn.functional as F

import fedgan_utils as fu


def proximal_term(model, anchor, mu):
    """FedProx's (mu/2)|w - w_global|^2 over a model's parameters."""
    return mu / 2 * sum((p - a).square().sum() for p, a in zip(model.parameters(), anchor))


def reference_round(generator, discriminator, images, labels, plan, config, prox_mu=0.0):
    """Train each selected client in turn from copies of the global models; return FedAvg of the results."""
    num_clients, max_steps, batch = plan.batch_indices.shape
    device = images.device  # the engine draws its noise on the data's device: so does the reference
    noise_gen = torch.Generator(device=device).manual_seed(plan.noise_seed)
    noise = [torch.randn((num_clients, batch, generator.z_dim), generator=noise_gen, device=device)
             for _ in range(max_steps)]
    g_states, d_states, d_losses, g_losses = [], [], [], []
    for row in range(num_clients):
        client_g, client_d = (copy.deepcopy(net).to(device).train() for net in (generator, discriminator))
        g_anchor = [p.detach().to(device) for p in generator.parameters()]
        d_anchor = [p.detach().to(device) for p in discriminator.parameters()]
        g_optimizer = torch.optim.Adam(client_g.parameters(), lr=config.lr_g, betas=config.betas)
        d_optimizer = torch.optim.Adam(client_d.parameters(), lr=config.lr_d, betas=config.betas)
        d_total = g_total = 0.0
        for step in range(int(plan.steps[row])):
            idx = plan.batch_indices[row, step]
            real = images[idx].float() / 127.5 - 1.0
            y = labels[idx]
            fake = client_g(noise[step][row], y)

            d_optimizer.zero_grad()
            real_logits, fake_logits = client_d(real, y), client_d(fake.detach(), y)
            d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                      + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
            (d_loss + proximal_term(client_d, d_anchor, prox_mu)).backward()
            d_optimizer.step()

            g_optimizer.zero_grad()
            logits = client_d(fake, y)
            g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            (g_loss + proximal_term(client_g, g_anchor, prox_mu)).backward()
            g_optimizer.step()
            d_total, g_total = d_total + d_loss.item(), g_total + g_loss.item()
        g_states.append(client_g.state_dict())
        d_states.append(client_d.state_dict())
        d_losses.append(d_total / int(plan.steps[row]))
        g_losses.append(g_total / int(plan.steps[row]))
    weights = plan.sizes.tolist()
    return fu.fedavg(g_states, weights), fu.fedavg(d_states, weights), d_losses, g_losses
