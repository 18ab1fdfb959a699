"""Text rendering of a cart."""


def render(cart):
    items = sorted(cart.items.items())
    lines = [f"{name} x{qty} @ {price:.2f}" for name, (price, qty) in items]
    lines.append(f"total {cart.total():.2f}")
    return "\n".join(lines)
