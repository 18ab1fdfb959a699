import unittest

from slugger import slugify


class TestSlugify(unittest.TestCase):
    def test_single_word(self):
        self.assertEqual(slugify("Hello"), "hello")

    def test_two_words(self):
        self.assertEqual(slugify("Hello World"), "hello-world")
