"""The provider role: selling inference on this node's models.

    _offers           Offer: one model for sale as configured, and its wire form
    _capabilities     GPU/CPU/RAM probe (NVML; no driver means no GPU) and concurrency from memory
    _pricing_models   dynamic pricing: the listed price as utilization moves (pure)
    _schedule         weekly availability hours and maintenance windows (pure)
    _sla              SLA targets measured from the provider's own records; breach discounts
    _health           health checks; an unhealthy model leaves the listing until it recovers
    _queue            JobQueue: bounded, weighted fair share of a model's generation slots
    _admission        who may open a session or start a call, and the seats they hold (pure)
    _storefront       Storefront: what this node sells now (offers, backends, health, schedule,
                      prices, contracts) and the listing that says so, republished as they move
    _session_service  the provider's side of ``protocol.SESSION_PROTOCOL``
    _chunks           one backend piece cut into chunks that each fit a frame (text, tool calls, logprobs);
                      merge_pieces: pieces that waited for the stream, as one
    _chunk_writer     ChunkWriter: a call's output streamed by one task while the backend generates,
                      the first piece at once, what waits merged
    _channels         ChannelBook: what each escrow channel owes this provider, and when to claim (pure)
    _settlement       SettlementWorker: claims it from the agents (margin before expiry, backoff,
                      restarts) and records their confirmed payments in receipts.db
    backends/         the models themselves (transformers, builtin, embeddings, openai upstream, llama.cpp)

Imports ``net`` and ``escrow`` (to be paid), never ``consumer`` or ``api``.
"""

from ._capabilities import derive_max_jobs, hardware_of, probe_capabilities
from ._health import HealthConfig, HealthMonitor
from ._offers import Offer, parse_backend
from ._pricing_models import DynamicPricing
from ._queue import JobQueue, QueueFull, QueueTimeout
from ._schedule import Schedule
from ._session_service import ProviderService
from ._sla import SlaConfig, SlaTracker

__all__ = [
    "derive_max_jobs",
    "DynamicPricing",
    "hardware_of",
    "HealthConfig",
    "HealthMonitor",
    "JobQueue",
    "Offer",
    "parse_backend",
    "probe_capabilities",
    "ProviderService",
    "QueueFull",
    "QueueTimeout",
    "Schedule",
    "SlaConfig",
    "SlaTracker",
]
