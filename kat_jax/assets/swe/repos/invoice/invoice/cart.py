"""A shopping cart."""


class Cart:
    def __init__(self):
        self.items = {}

    def add(self, name, price, qty=1):
        if qty <= 0:
            raise ValueError("quantity must be positive")
        self.items[name] = (price, qty)

    def quantity(self, name):
        return self.items.get(name, (0, 0))[1]

    def total(self, discount_percent=0):
        subtotal = sum(price * qty for price, qty in self.items.values())
        return round(subtotal * (1 - discount_percent / 100), 2)
