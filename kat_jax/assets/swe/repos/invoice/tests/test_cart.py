import unittest

from invoice import Cart
from invoice.format import render


class TestCart(unittest.TestCase):
    def test_total(self):
        c = Cart()
        c.add("pen", 1.25, 4)
        c.add("book", 10.0)
        self.assertEqual(c.total(), 15.0)

    def test_discount(self):
        c = Cart()
        c.add("pen", 2.0, 5)
        self.assertEqual(c.total(discount_percent=10), 9.0)

    def test_render(self):
        c = Cart()
        c.add("pen", 2.0, 2)
        self.assertEqual(render(c), "pen x2 @ 2.00\ntotal 4.00")
