"""The domain core: money, cards, postings, card crypto, storage. Never imports grpc."""
