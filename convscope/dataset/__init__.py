"""Work over many images: data sources and the streaming top-k patch miner."""
