"""In-memory snapshots: the node-local rung of the transitions' ladder of sources.

Usage (with ``unicron-run --unicron``)::

    pretrain_gpt.py ... --unicron --unicron-snapshot-interval N [--unicron-persist-interval M --save DIR]

or ``unicron: {snapshot_interval: N, persist_interval: M}`` in the YAML job config.

* Every N iterations each worker copies its shards (parameters and Adam state, every replica it holds;
  a DistributedOptimizer rank's own flat ranges of the optimizer state)
  and its trainer-level state to node-local shared memory on a background thread while the next
  iteration's forward and backward run; the optimizer step waits for the copy (``service``,
  ``writer``). Two slots per rank, each with a manifest written last and a CRC-32C per shard, so a crash
  mid-copy leaves the previous snapshot valid (``layout``, ``manifest``).
* The node's agent owns the directory: the files outlive a crashed worker and are removed when the job
  ends; with several nodes it streams every new snapshot to node (k+1) mod nnodes, which keeps it under
  ``replicas/`` (``node_store``, ``replication``).
* Every M snapshots (iteration N·M on every rank) the state is persisted asynchronously as a normal
  torch_dist checkpoint in ``--save`` (``megatron.async_save``): planning and finalising on the training
  thread, the write on a background thread.
* A transition whose live copies leave a hole reads and verifies the snapshots (``reader``) and offers
  them after every live copy: this iteration's snapshots, else the newest older iteration whose snapshots
  cover everything (every member rolls back to it), else the newest persistent checkpoint (``ladder``).

With ``--use-distributed-optimizer`` a rank's optimizer shards are stored as flat ranges of model-space
boxes (``megatron.distopt_state``, described locally: no collective) and planned by
``transition.flat_plan``.

Limitations: memory: two copies of a rank's state in shared memory per rank, two more per replicated
rank on the peer node, and a transition that needs snapshots reads the ones it serves into private
memory. Replicas lag their source by up to a
poll interval (0.2 s) plus the transfer, so after a node loss they are useful when the job rolls back
to their iteration.
"""
