// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./Test.sol";
import {Credits} from "../../src/Credits.sol";
import {Escrow} from "../../src/Escrow.sol";
import {NodeRegistry} from "../../src/NodeRegistry.sol";
import {Settlement} from "../../src/Settlement.sol";
import {Slashing} from "../../src/Slashing.sol";
import {Receipt} from "../../src/lib/NectarTypes.sol";

/// @notice Deploys and wires the whole contract set the way the devnet does, with helpers to sign vouchers and
///         receipts and to build settle batches. Shared by every contract's tests.
/// @author Nectar
abstract contract NectarFixture is Test {
    uint256 internal constant FAUCET_CAP = 1_000_000 ether;
    uint256 internal constant UNLOCK_DELAY = 1 days;
    uint256 internal constant MIN_STAKE = 100 ether;
    uint256 internal constant UNBOND_DELAY = 7 days;
    uint16 internal constant FEE_BPS = 100;
    uint256 internal constant DISPUTE_WINDOW = 1 days;
    uint256 internal constant MAX_EVIDENCE_AGE = 3 days;
    uint256 internal constant DOUBLE_SIGN_BPS = 5_000;
    uint256 internal constant REPORTER_BPS = 1_000;
    uint256 internal constant SPOT_CHECK_BPS = 1_000;
    uint256 internal constant CHALLENGE_PERIOD = 1 hours;
    uint256 internal constant MAX_CASES_PER_EPOCH = 4;

    uint256 internal constant CLIENT_PK = 0xC11E;
    uint256 internal constant CLIENT2_PK = 0xC22E;
    uint256 internal constant NODE_PK = 0xA0DE;
    uint256 internal constant NODE2_PK = 0xB0DE;

    address internal owner = address(0x0A11);
    address internal treasury = address(0x7EA5);
    address internal ledger = address(0x1ED6);
    address internal verifier = address(0x7E41);
    address internal arbiter = address(0xA4B1);
    address internal manager = address(0x3A9E);

    address internal client;
    address internal client2;
    address internal node;
    address internal node2;

    Credits internal credits;
    Escrow internal escrow;
    NodeRegistry internal registry;
    Settlement internal settlement;
    Slashing internal slashing;

    function setUp() public virtual {
        client = vm.addr(CLIENT_PK);
        client2 = vm.addr(CLIENT2_PK);
        node = vm.addr(NODE_PK);
        node2 = vm.addr(NODE2_PK);

        credits = new Credits(owner, FAUCET_CAP);
        registry = new NodeRegistry(credits, MIN_STAKE, UNBOND_DELAY, treasury, owner);
        settlement = new Settlement(credits, UNLOCK_DELAY, owner, treasury, FEE_BPS, CHALLENGE_PERIOD);
        escrow = settlement; // the vault is Settlement's base: one contract holds the credits
        slashing = new Slashing(registry, settlement, arbiter, manager, 1, _slashParams());
        vm.startPrank(owner);
        registry.setSlasher(address(slashing));
        settlement.setRootCommitter(ledger, true);
        vm.stopPrank();
        vm.prank(manager);
        slashing.setVerifier(verifier, true);
    }

    function _slashParams() internal pure returns (Slashing.Params memory) {
        return Slashing.Params({
            doubleSignSlashBps: DOUBLE_SIGN_BPS,
            reporterRewardBps: REPORTER_BPS,
            spotCheckSlashBps: SPOT_CHECK_BPS,
            disputeWindow: DISPUTE_WINDOW,
            maxEvidenceAge: MAX_EVIDENCE_AGE,
            maxCasesPerEpoch: MAX_CASES_PER_EPOCH
        });
    }

    /*//////////////////////////////////////////////////////////////
                                 FUNDS
    //////////////////////////////////////////////////////////////*/

    function _mint(address to, uint256 amount) internal {
        vm.prank(owner);
        credits.mint(to, amount);
    }

    function _deposit(address who, uint256 amount) internal {
        _mint(who, amount);
        vm.startPrank(who);
        credits.approve(address(escrow), amount);
        escrow.deposit(amount);
        vm.stopPrank();
    }

    function _register(address who, uint256 stake) internal {
        _mint(who, stake);
        vm.startPrank(who);
        credits.approve(address(registry), stake);
        registry.register("12D3KooWNectarTestPeer", stake);
        vm.stopPrank();
    }

    /// @dev The protocol fee Settlement takes from `gross` paid to one node.
    function _fee(uint256 gross) internal pure returns (uint256) {
        return gross * uint256(FEE_BPS) / 10_000;
    }

    /*//////////////////////////////////////////////////////////////
                                VOUCHERS
    //////////////////////////////////////////////////////////////*/

    /// @dev A voucher's settle word for a channel whose partner is its own node (same list position).
    function _pack(uint256 nodeIndex, uint64 channelId, uint128 cumulative) internal pure returns (uint256) {
        return _packPair(nodeIndex, nodeIndex, channelId, cumulative);
    }

    function _packPair(uint256 nodeIndex, uint256 partnerIndex, uint64 channelId, uint128 cumulative)
        internal
        pure
        returns (uint256)
    {
        return nodeIndex << 224 | partnerIndex << 192 | uint256(channelId) << 128 | cumulative;
    }

    /// @dev A voucher from `clientPk` to `to` on a channel that shares its slot with `to`'s channel `channelId ^ 1`.
    function _voucher(uint256 clientPk, address to, uint256 nodeIndex, uint64 channelId, uint128 cumulative)
        internal
        view
        returns (Settlement.SignedVoucher memory v)
    {
        return _pairedVoucher(clientPk, to, to, nodeIndex, nodeIndex, channelId, cumulative);
    }

    /// @dev A voucher from `clientPk` to `to` naming `partner` (at `partnerIndex` of the batch's node list).
    function _pairedVoucher(
        uint256 clientPk,
        address to,
        address partner,
        uint256 nodeIndex,
        uint256 partnerIndex,
        uint64 channelId,
        uint128 cumulative
    ) internal view returns (Settlement.SignedVoucher memory v) {
        bytes32 digest = settlement.voucherDigest(vm.addr(clientPk), to, partner, channelId, cumulative);
        (v.r, v.vs) = vm.signCompact(clientPk, digest);
        v.packed = _packPair(nodeIndex, partnerIndex, channelId, cumulative);
    }

    /// @dev A batch of one voucher from `clientPk` to `to`.
    function _single(uint256 clientPk, address to, uint64 channelId, uint128 cumulative)
        internal
        view
        returns (address[] memory nodes, Settlement.ClientVouchers[] memory groups)
    {
        uint64[] memory channelIds = new uint64[](1);
        channelIds[0] = channelId;
        uint128[] memory amounts = new uint128[](1);
        amounts[0] = cumulative;
        return _group(clientPk, to, channelIds, amounts);
    }

    /// @dev One group of `client` paying `to` on each of `channelIds` the matching `amounts`.
    function _group(uint256 clientPk, address to, uint64[] memory channelIds, uint128[] memory amounts)
        internal
        view
        returns (address[] memory nodes, Settlement.ClientVouchers[] memory groups)
    {
        nodes = new address[](1);
        nodes[0] = to;
        groups = new Settlement.ClientVouchers[](1);
        groups[0].client = vm.addr(clientPk);
        groups[0].vouchers = new Settlement.SignedVoucher[](channelIds.length);
        for (uint256 i; i < channelIds.length; ++i) {
            groups[0].vouchers[i] = _voucher(clientPk, to, 0, channelIds[i], amounts[i]);
        }
    }

    function _settleOne(uint256 clientPk, address to, uint64 channelId, uint128 cumulative) internal {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) =
            _single(clientPk, to, channelId, cumulative);
        settlement.settle(nodes, groups);
    }

    /*//////////////////////////////////////////////////////////////
                                RECEIPTS
    //////////////////////////////////////////////////////////////*/

    function _receipt(address by, bytes32 sessionId, uint64 step, bytes32 output)
        internal
        view
        returns (Receipt memory r)
    {
        r = Receipt({
            sessionId: sessionId,
            step: step,
            kind: 0,
            modelId: keccak256("tiny-llama"),
            blockStart: 0,
            blockEnd: 4,
            node: by,
            client: client,
            tokens: 7,
            price: 1e12,
            amount: 7e12,
            inputCommitment: keccak256("input"),
            outputCommitment: output,
            fingerprint: keccak256("fingerprint"),
            timestamp: uint64(block.timestamp)
        });
    }

    function _signReceipt(uint256 pk, Receipt memory r) internal view returns (bytes memory) {
        (uint8 v, bytes32 rr, bytes32 s) = vm.sign(pk, settlement.receiptDigest(r));
        return abi.encodePacked(rr, s, v);
    }

    /*//////////////////////////////////////////////////////////////
                          EPOCH ROOTS AND CASES
    //////////////////////////////////////////////////////////////*/

    function _sortedPair(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        return a < b ? keccak256(abi.encodePacked(a, b)) : keccak256(abi.encodePacked(b, a));
    }

    /// @dev The epoch tree of nectar.wire.merkle over `leaves` (sorted, sorted pairs, an odd node promoted): its root
    ///      and the proof of `leaves[index]`.
    function _merkle(bytes32[] memory leaves, uint256 index)
        internal
        pure
        returns (bytes32 root, bytes32[] memory proof)
    {
        bytes32 leaf = leaves[index];
        bytes32[] memory level = new bytes32[](leaves.length);
        for (uint256 i; i < leaves.length; ++i) {
            level[i] = leaves[i];
        }
        for (uint256 i; i < level.length; ++i) {
            for (uint256 j = i + 1; j < level.length; ++j) {
                if (level[j] < level[i]) (level[i], level[j]) = (level[j], level[i]);
            }
        }
        uint256 position;
        while (level[position] != leaf) ++position;
        bytes32[] memory path = new bytes32[](64);
        uint256 depth;
        while (level.length > 1) {
            if ((position ^ 1) < level.length) path[depth++] = level[position ^ 1];
            bytes32[] memory parents = new bytes32[]((level.length + 1) / 2);
            for (uint256 i; i + 1 < level.length; i += 2) {
                parents[i / 2] = _sortedPair(level[i], level[i + 1]);
            }
            if (level.length % 2 == 1) parents[parents.length - 1] = level[level.length - 1];
            level = parents;
            position /= 2;
        }
        root = level[0];
        proof = new bytes32[](depth);
        for (uint256 i; i < depth; ++i) {
            proof[i] = path[i];
        }
    }

    function _leaf(Receipt memory r) internal view returns (bytes32) {
        return settlement.receiptLeaf(r);
    }

    /// @dev Commits the next epoch over `receipts` as the ledger (no wait); returns its number and each receipt's proof.
    function _commitEpoch(Receipt[] memory receipts) internal returns (uint64 epoch, bytes32[][] memory proofs) {
        bytes32[] memory leaves = new bytes32[](receipts.length);
        for (uint256 i; i < receipts.length; ++i) {
            leaves[i] = _leaf(receipts[i]);
        }
        proofs = new bytes32[][](receipts.length);
        bytes32 root;
        for (uint256 i; i < receipts.length; ++i) {
            (root, proofs[i]) = _merkle(leaves, i);
        }
        epoch = settlement.latestEpoch() + 1;
        vm.prank(ledger);
        // forge-lint: disable-next-line(unsafe-typecast) -- test epochs hold a handful of receipts
        settlement.commitEpochRoot(epoch, root, uint32(receipts.length));
    }

    /// @dev A receipt of `by` (key `pk`) with output `output`, committed alone in the next epoch whose challenge period
    ///      is then waited out: everything a verifier needs to open a case on it.
    function _citable(uint256 pk, bytes32 output)
        internal
        returns (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof)
    {
        r = _receipt(vm.addr(pk), keccak256(abi.encode("session", output)), 3, output);
        sig = _signReceipt(pk, r);
        Receipt[] memory one = new Receipt[](1);
        one[0] = r;
        bytes32[][] memory proofs;
        (epoch, proofs) = _commitEpoch(one);
        proof = proofs[0];
        vm.warp(block.timestamp + CHALLENGE_PERIOD);
    }

    /// @dev `who` (a verifier) attests a failed spot check of receipt `r`.
    function _attest(address who, uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof)
        internal
        returns (bytes32)
    {
        vm.prank(who);
        return slashing.attestSpotCheckFailure(epoch, r, sig, proof, keccak256("re-execution record"));
    }

    /// @dev Opens a case against the node of key `pk` on a fresh receipt in a fresh epoch.
    function _openCase(uint256 pk, bytes32 output) internal returns (bytes32) {
        (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof) = _citable(pk, output);
        return _attest(verifier, epoch, r, sig, proof);
    }
}
