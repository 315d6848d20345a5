"""What goes in and comes out: the tokenizer, image preprocessing, and streamed text."""
