"""In-memory snapshots: the node-local rung of the transitions' ladder of sources.

Every N iterations each worker copies its shards to node-local shared memory on a background thread
(``service``, ``writer``: double-buffered slots with a manifest and a CRC32 per shard, ``layout``,
``manifest``); the node's agent keeps them beyond a worker's death, replicates them to one peer node
(``replication``, ``node_store``) and removes them when the job ends. Every M snapshots the state is
persisted asynchronously as a normal torch_dist checkpoint. A transition reads and verifies them
(``reader``) and offers them after every live copy (``ladder``).
"""
