"""Shared market data: hourly observations every node signs of its own trade, the market's price
distribution and trend built from everyone's, and a provider's advice.

    _market_data  MarketData (HOME/market.db), the figures of ``node market`` and how they are counted
    _advice       ``node advise``: position, utilization, turned-away demand, peak hours, a suggested price
    _service      a node's insight: its hourly observer and the observation topic
                  (imported by the composition root only: it pulls in the network stack)
"""

from ._advice import Advice, ModelAdvice, OfferedModel, advise
from ._market_data import MarketData, MarketFigures, figures, percentile, price_sample

__all__ = ["Advice", "advise", "figures", "MarketData", "MarketFigures", "ModelAdvice", "OfferedModel",
           "percentile", "price_sample"]
