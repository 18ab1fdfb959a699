from invoice.cart import Cart
