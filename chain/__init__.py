"""nectar.chain: the on-chain half of the marketplace, from Python. Every web3.py call in Nectar lives here.

Contracts (Solidity, ``contracts/src``, built by forge into ``contracts/out``; ABIs are read from there):
``Credits`` (ERC-20 + permit, devnet faucet), ``Escrow`` (client deposits with an unlock delay; per-node reserves
that back a client's vouchers; node earnings),
``NodeRegistry`` (peer id, stake, unbonding), ``Settlement`` (batched EIP-712 cumulative vouchers, epoch receipt
roots; its address is the EIP-712 ``verifyingContract``), ``Slashing`` (double-sign proofs, k-of-n spot checks).

API::

    from nectar.chain import Chain, ChainError, Deployment, load_deployment, start_devnet

    dep = load_deployment(path=None)        # nectar.paths.deployment_path() by default; DeploymentNotFound if missing
    chain = Chain(dep)                      # or Chain.from_deployment(path=None)
    chain.w3, chain.chain_id, chain.address_of("Settlement")
    chain.eip712_domain()                   # {"name": "Nectar", "version": "1", "chainId", "verifyingContract"}
    chain.faucet(to, amount); chain.credit_balance(addr)
    chain.deposit(private_key, amount)      # permit + deposit, one transaction
    chain.request_withdrawal(private_key, amount); chain.withdraw(private_key)   # after the unlock delay
    chain.escrow_balance(client); chain.pending_withdrawal(client) -> (amount, unlock_at)
    chain.reserve(private_key, node, amount)   # free escrow -> a reserve only node's vouchers draw on
    chain.request_reserve_release(private_key, node, amount); chain.release_reserve(private_key, node)  # unlock delay
    chain.reserve_of(client, node) -> {"amount", "pendingRelease", "releaseAt"}; chain.unlock_delay()
    chain.exit_requests_since(block) -> [{"client", "node" (None: a withdrawal), "amount", "unlockAt", ...}]
    chain.register_node(private_key, peer_id, stake); chain.stake_of(node); chain.node_info(node)
    chain.add_stake(private_key, amount); chain.request_unbond(private_key, amount); chain.unbond(private_key)
    chain.settle(private_key, [(voucher_dict, sig65), ...]) -> TxResult  # result.skipped: not paid
    chain.paid(client, node, channel_id[, partner]); chain.node_balance(node); chain.withdraw_earnings(private_key)
    chain.commit_epoch_root(private_key, epoch, root, count)   # in order: latest_epoch() + 1; empty: (zeros, 0)
    chain.correct_epoch_root(private_key, epoch, root, count)  # within challenge_period() of the first commit
    chain.epoch_root(epoch) -> bytes (zeros if none); chain.epoch_info(epoch) -> {"root", "count", "finalAt", ...}
    chain.verify_inclusion(epoch, receipt or its struct hash, proof) -> bool
    chain.slash_double_sign(private_key, receipt_a, sig_a, receipt_b, sig_b)
    chain.attest_spot_check_failure(private_key, epoch=, receipt=, signature=, proof=, record_hash=)  # final root
    chain.finalize_slash(private_key, case_id)   # case id = the receipt's leaf; after the dispute window
    chain.dismiss_case(arbiter_key, case_id)   # the arbiter; never the verifier manager:
    chain.set_verifier(manager_key, addr); chain.set_verifier_threshold(manager_key, k)
    chain.set_root_committer(key, addr); chain.set_peer_id(private_key, peer_id)   # owner / node administration
    chain.deposits_since(block) -> [{"client", "amount", "balance", "blockNumber", "txHash", "logIndex"}]
    chain.settlements_since(block) -> [{"submitter", "vouchers": [voucher dicts], "gross", "fee", ...}]
    chain.events(contract, event, from_block=..., filters=...)   # any other event
    chain.advance_time(seconds)             # devnet only

    handle = start_devnet(port=8545, state_dir=None)   # anvil + deploy + fund + deployment file; handle.stop()

Vouchers and receipts are protocol dicts (docs/protocol.md keys; bytes or hex, ints or decimal strings) or
``nectar.wire`` objects (anything with ``to_message()``); signatures are 65-byte r||s||v. Writes return
``TxResult(tx_hash, gas_used, block_number, events)``. Reverts raise ``ChainError`` whose message starts with the
contract's custom error, e.g. ``InvalidSignature(index=0)``; ``.error_name`` / ``.error_args`` hold it decoded.

Files: ``client.py`` (Chain), ``tx.py`` (signing, sending, event decoding), ``errors.py`` (revert decoding),
``encoding.py`` (settle calldata, receipt tuples), ``deployment.py`` (the deployment file), ``deploy.py``
(deploying from forge artifacts), ``artifacts.py`` (forge output and npm tools), ``accounts.py`` (Anvil dev keys),
``devnet.py`` (start_devnet), ``cli.py`` (``nectar devnet``, ``nectar escrow``).
"""

from .client import Chain
from .deploy import DeployParams
from .deployment import Deployment, DeploymentNotFound, load_deployment
from .devnet import DevnetHandle, free_port, start_devnet
from .errors import ChainError
from .tx import TxResult

__all__ = [
    "Chain",
    "ChainError",
    "DeployParams",
    "Deployment",
    "DeploymentNotFound",
    "DevnetHandle",
    "TxResult",
    "free_port",
    "load_deployment",
    "start_devnet",
]
