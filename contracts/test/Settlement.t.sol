// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {Escrow} from "../src/Escrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {Receipt} from "../src/lib/NectarTypes.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

contract SettlementTest is NectarFixture {
    event BatchSettled(address indexed submitter, uint256 vouchers, uint256 gross, uint256 fee);
    event Charged(address indexed client, uint256 amount, uint256 balance);
    event EarningsCredited(address indexed payee, uint256 amount);
    event EpochRootCommitted(uint64 indexed epoch, bytes32 root, uint32 count, address indexed committer);
    event VoucherSkipped(
        address indexed client, address indexed node, uint64 indexed channelId, uint256 index, uint8 reason
    );

    uint8 internal constant ALREADY_SETTLED = 1; // Settlement.SKIP_ALREADY_SETTLED
    uint8 internal constant INSUFFICIENT_ESCROW = 2; // Settlement.SKIP_INSUFFICIENT_ESCROW

    uint256 internal constant SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;

    function setUp() public override {
        super.setUp();
        _deposit(client, 100 ether);
        _deposit(client2, 100 ether);
    }

    /*//////////////////////////////////////////////////////////////
                                 SETTLE
    //////////////////////////////////////////////////////////////*/

    function test_SettleOneVoucher() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 7, 2 ether);
        vm.expectEmit(address(escrow));
        emit Charged(client, 2 ether, 98 ether);
        vm.expectEmit(address(escrow));
        emit EarningsCredited(node, 2 ether - _fee(2 ether));
        vm.expectEmit(address(escrow));
        emit EarningsCredited(treasury, _fee(2 ether));
        vm.expectEmit(address(settlement));
        emit BatchSettled(address(this), 1, 2 ether, _fee(2 ether));
        uint256 gross = settlement.settle(nodes, groups);
        assertEq(gross, 2 ether, "gross");
        assertEq(settlement.paid(client, node, node, 7), 2 ether, "paid");
        assertEq(escrow.balanceOf(client), 98 ether, "client escrow");
        assertEq(escrow.earningsOf(node), 2 ether - _fee(2 ether), "node earnings");
        assertEq(escrow.earningsOf(treasury), _fee(2 ether), "fee");
    }

    function test_SettlePaysOnlyTheCumulativeDifference() public {
        _settleOne(CLIENT_PK, node, 1, 3 ether);
        _settleOne(CLIENT_PK, node, 1, 5 ether);
        assertEq(settlement.paid(client, node, node, 1), 5 ether, "paid");
        assertEq(escrow.balanceOf(client), 95 ether, "charged 5 in total");
        assertEq(escrow.earningsOf(node), 5 ether - _fee(3 ether) - _fee(2 ether), "node got 5 less fees");
    }

    function test_ChannelsAreIndependent() public {
        _settleOne(CLIENT_PK, node, 1, 3 ether);
        _settleOne(CLIENT_PK, node, 2, 1 ether);
        _settleOne(CLIENT_PK, node2, 1, 1 ether);
        assertEq(settlement.paid(client, node, node, 1), 3 ether, "channel 1");
        assertEq(settlement.paid(client, node, node, 2), 1 ether, "channel 2");
        assertEq(settlement.paid(client, node2, node2, 1), 1 ether, "other node");
        assertEq(escrow.balanceOf(client), 95 ether, "all charged");
    }

    function test_SettleBatchOfTwoClientsAndTwoNodes() public {
        address[] memory nodes = new address[](2);
        nodes[0] = node;
        nodes[1] = node2;
        Settlement.ClientVouchers[] memory groups = new Settlement.ClientVouchers[](2);
        groups[0].client = client;
        groups[0].vouchers = new Settlement.SignedVoucher[](2);
        groups[0].vouchers[0] = _voucher(CLIENT_PK, node, 0, 1, 1 ether);
        groups[0].vouchers[1] = _voucher(CLIENT_PK, node2, 1, 1, 2 ether);
        groups[1].client = client2;
        groups[1].vouchers = new Settlement.SignedVoucher[](2);
        groups[1].vouchers[0] = _voucher(CLIENT2_PK, node, 0, 9, 3 ether);
        groups[1].vouchers[1] = _voucher(CLIENT2_PK, node2, 1, 9, 4 ether);
        vm.prank(node); // anyone may submit, e.g. a node while the ledger is down
        assertEq(settlement.settle(nodes, groups), 10 ether, "gross");
        assertEq(escrow.balanceOf(client), 97 ether, "client charged");
        assertEq(escrow.balanceOf(client2), 93 ether, "client2 charged");
        assertEq(escrow.earningsOf(node), 4 ether - _fee(4 ether), "node");
        assertEq(escrow.earningsOf(node2), 6 ether - _fee(6 ether), "node2");
        assertEq(escrow.earningsOf(treasury), _fee(4 ether) + _fee(6 ether), "fees");
    }

    function testFuzz_SettleAmounts(uint256 deposit, uint256 first, uint256 second) public {
        deposit = bound(deposit, 1, type(uint128).max / 4);
        first = bound(first, 1, deposit);
        second = bound(second, first + 1, deposit + 1);
        _deposit(node2, deposit); // a fresh client: node2's key is as good as any
        _settleOne(NODE2_PK, node, 3, uint128(first));
        assertEq(escrow.balanceOf(node2), deposit - first, "after first");
        if (second > deposit) {
            (address[] memory nodes, Settlement.ClientVouchers[] memory groups) =
                _single(NODE2_PK, node, 3, uint128(second));
            vm.expectEmit(address(settlement));
            emit VoucherSkipped(node2, node, 3, 0, INSUFFICIENT_ESCROW);
            assertEq(settlement.settle(nodes, groups), 0, "nothing settled");
            assertEq(escrow.balanceOf(node2), deposit - first, "uncovered voucher skipped");
            return;
        }
        _settleOne(NODE2_PK, node, 3, uint128(second));
        assertEq(escrow.balanceOf(node2), deposit - second, "after second");
        assertEq(escrow.earningsOf(node) + escrow.earningsOf(treasury), second, "conserved");
    }

    function test_SkipWhen_Replay() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        settlement.settle(nodes, groups);
        uint256 earned = escrow.earningsOf(node);
        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 1, 0, ALREADY_SETTLED);
        assertEq(settlement.settle(nodes, groups), 0, "replay pays nothing");
        assertEq(escrow.balanceOf(client), 99 ether, "charged once");
        assertEq(escrow.earningsOf(node), earned, "earned once");
    }

    function testFuzz_SkipWhen_CumulativeNotAbovePaid(uint256 lower) public {
        _settleOne(CLIENT_PK, node, 1, 5 ether);
        lower = bound(lower, 0, 5 ether);
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) =
            _single(CLIENT_PK, node, 1, uint128(lower));
        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 1, 0, ALREADY_SETTLED);
        assertEq(settlement.settle(nodes, groups), 0, "nothing settled");
        assertEq(settlement.paid(client, node, node, 1), 5 ether, "paid unchanged");
    }

    function test_SkipWhen_DuplicateInsideBatch() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        Settlement.SignedVoucher memory v = groups[0].vouchers[0];
        groups[0].vouchers = new Settlement.SignedVoucher[](2);
        groups[0].vouchers[0] = v;
        groups[0].vouchers[1] = v;
        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 1, 1, ALREADY_SETTLED);
        assertEq(settlement.settle(nodes, groups), 1 ether, "paid once");
    }

    /// @dev Issue 20, batch griefing: a voucher copied out of a pending batch and settled first (front-run) used to
    ///      revert the whole batch with VoucherReplay(1) (failed on the old code); now it is skipped and the rest
    ///      of the batch settles.
    function test_Attack_FrontRunOneVoucherDoesNotRevertBatch() public {
        address[] memory nodes = new address[](1);
        nodes[0] = node;
        Settlement.ClientVouchers[] memory groups = new Settlement.ClientVouchers[](2);
        groups[0].client = client;
        groups[0].vouchers = new Settlement.SignedVoucher[](2);
        groups[0].vouchers[0] = _voucher(CLIENT_PK, node, 0, 1, 1 ether);
        groups[0].vouchers[1] = _voucher(CLIENT_PK, node, 0, 2, 2 ether);
        groups[1].client = client2;
        groups[1].vouchers = new Settlement.SignedVoucher[](1);
        groups[1].vouchers[0] = _voucher(CLIENT2_PK, node, 0, 7, 3 ether);

        // the attacker copies voucher 1 out of the mempool and settles it alone
        Settlement.ClientVouchers[] memory stolen = new Settlement.ClientVouchers[](1);
        stolen[0].client = client;
        stolen[0].vouchers = new Settlement.SignedVoucher[](1);
        stolen[0].vouchers[0] = groups[0].vouchers[1];
        vm.prank(client2);
        settlement.settle(nodes, stolen);

        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 2, 1, ALREADY_SETTLED);
        assertEq(settlement.settle(nodes, groups), 4 ether, "the rest settles");
        assertEq(escrow.balanceOf(client), 97 ether, "client charged each voucher once");
        assertEq(escrow.balanceOf(client2), 97 ether, "client2 charged");
        assertEq(escrow.earningsOf(node) + escrow.earningsOf(treasury), 6 ether, "node paid all three once");
    }

    /// @dev Issue 20, batch griefing: a client that drains its escrow (withdrawal at unlock) before the batch lands
    ///      used to revert the whole batch with InsufficientEscrow(0) (failed on the old code); now its voucher is
    ///      skipped and the other clients' vouchers settle.
    function test_Attack_ClientDrainingEscrowDoesNotRevertBatch() public {
        vm.prank(client);
        escrow.requestWithdrawal(100 ether);
        vm.warp(block.timestamp + escrow.unlockDelay());
        vm.prank(client);
        escrow.withdraw();

        address[] memory nodes = new address[](1);
        nodes[0] = node;
        Settlement.ClientVouchers[] memory groups = new Settlement.ClientVouchers[](2);
        groups[0].client = client;
        groups[0].vouchers = new Settlement.SignedVoucher[](1);
        groups[0].vouchers[0] = _voucher(CLIENT_PK, node, 0, 1, 1 ether);
        groups[1].client = client2;
        groups[1].vouchers = new Settlement.SignedVoucher[](1);
        groups[1].vouchers[0] = _voucher(CLIENT2_PK, node, 0, 1, 2 ether);

        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 1, 0, INSUFFICIENT_ESCROW);
        assertEq(settlement.settle(nodes, groups), 2 ether, "client2's voucher settles");
        assertEq(settlement.paid(client, node, node, 1), 0, "the uncovered voucher stays unpaid");
        assertEq(escrow.balanceOf(client2), 98 ether, "client2 charged");
    }

    function test_AllSkippedBatchDoesNotRevert() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        settlement.settle(nodes, groups);
        uint256 treasuryEarned = escrow.earningsOf(treasury);
        vm.expectEmit(address(settlement));
        emit BatchSettled(address(this), 1, 0, 0);
        assertEq(settlement.settle(nodes, groups), 0, "front-run entirely: nothing left to pay");
        assertEq(escrow.earningsOf(treasury), treasuryEarned, "no fee");
    }

    function test_RevertWhen_SignedByAnotherKey() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT2_PK, node, 1, 1 ether);
        groups[0].client = client; // claims client's escrow with client2's signature
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidSignature.selector, 0));
        settlement.settle(nodes, groups);
    }

    function test_RevertWhen_AmountTampered() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        groups[0].vouchers[0].packed = _pack(0, 1, 2 ether);
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidSignature.selector, 0));
        settlement.settle(nodes, groups);
    }

    function test_RevertWhen_NodeSwapped() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        nodes[0] = node2; // redirect the payment
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidSignature.selector, 0));
        settlement.settle(nodes, groups);
    }

    function test_RevertWhen_ParityFlipped() public {
        // EIP-2098 leaves no room for a high s, so flipping the parity bit is the one malleation left: it
        // recovers some other key, never the client.
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        groups[0].vouchers[0].vs ^= bytes32(uint256(1) << 255);
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidSignature.selector, 0));
        settlement.settle(nodes, groups);
    }

    function testFuzz_RevertWhen_RandomSignature(bytes32 r, bytes32 vs) public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        vm.assume(r != groups[0].vouchers[0].r);
        groups[0].vouchers[0].r = r;
        groups[0].vouchers[0].vs = vs;
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidSignature.selector, 0));
        settlement.settle(nodes, groups);
    }

    function testFuzz_RevertWhen_WrongSigner(uint256 pk) public {
        pk = bound(pk, 1, SECP256K1_N - 1);
        vm.assume(pk != CLIENT_PK);
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(pk, node, 1, 1 ether);
        groups[0].client = client;
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidSignature.selector, 0));
        settlement.settle(nodes, groups);
    }

    function test_RevertWhen_ZeroClientAndGarbageSignature() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        groups[0].client = address(0);
        groups[0].vouchers[0].r = bytes32(0);
        groups[0].vouchers[0].vs = bytes32(0);
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidSignature.selector, 0));
        settlement.settle(nodes, groups);
    }

    function test_SkipWhen_OverSpend() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 100 ether + 1);
        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 1, 0, INSUFFICIENT_ESCROW);
        assertEq(settlement.settle(nodes, groups), 0, "nothing settled");
        assertEq(escrow.balanceOf(client), 100 ether, "not charged");
    }

    function test_SkipWhen_OverSpendAcrossVouchers() public {
        address[] memory nodes = new address[](1);
        nodes[0] = node;
        Settlement.ClientVouchers[] memory groups = new Settlement.ClientVouchers[](1);
        groups[0].client = client;
        groups[0].vouchers = new Settlement.SignedVoucher[](2);
        groups[0].vouchers[0] = _voucher(CLIENT_PK, node, 0, 1, 60 ether);
        groups[0].vouchers[1] = _voucher(CLIENT_PK, node, 0, 2, 60 ether);
        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 2, 1, INSUFFICIENT_ESCROW);
        assertEq(settlement.settle(nodes, groups), 60 ether, "the first voucher settles");
        assertEq(escrow.balanceOf(client), 40 ether, "charged the first only");
    }

    function test_SkipWhen_OverSpendAcrossTwoGroupsOfOneClient() public {
        // a client listed twice: the second group sees the balance the first one left (one account, written per group)
        address[] memory nodes = new address[](1);
        nodes[0] = node;
        Settlement.ClientVouchers[] memory groups = new Settlement.ClientVouchers[](2);
        for (uint256 g; g < 2; ++g) {
            groups[g].client = client;
            groups[g].vouchers = new Settlement.SignedVoucher[](1);
            groups[g].vouchers[0] = _voucher(CLIENT_PK, node, 0, uint64(1 + g), 60 ether);
        }
        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 2, 1, INSUFFICIENT_ESCROW);
        assertEq(settlement.settle(nodes, groups), 60 ether, "the first group charged");
        groups[1].vouchers[0] = _voucher(CLIENT_PK, node, 0, 2, 40 ether); // exactly what is left
        assertEq(settlement.settle(nodes, groups), 40 ether, "the second group charged, the first one skipped");
        assertEq(escrow.balanceOf(client), 0, "balance spent exactly");
        assertEq(
            credits.balanceOf(address(escrow)),
            escrow.balanceOf(client2) + escrow.earningsOf(node) + escrow.earningsOf(treasury),
            "vault"
        );
    }

    function test_RevertWhen_BadNodeIndex() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        groups[0].vouchers[0].packed = _pack(1, 1, 1 ether);
        vm.expectRevert(abi.encodeWithSelector(Settlement.BadNodeIndex.selector, 0));
        settlement.settle(nodes, groups);
    }

    function testFuzz_RevertWhen_GarbageInNodeIndexBits(uint256 high) public {
        high = bound(high, 1, type(uint64).max);
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, node, 1, 1 ether);
        groups[0].vouchers[0].packed |= high << 192;
        vm.expectRevert(abi.encodeWithSelector(Settlement.BadNodeIndex.selector, 0));
        settlement.settle(nodes, groups);
    }

    function test_RevertWhen_EmptyBatch() public {
        address[] memory nodes = new address[](0);
        Settlement.ClientVouchers[] memory groups = new Settlement.ClientVouchers[](0);
        vm.expectRevert(Settlement.EmptyBatch.selector);
        settlement.settle(nodes, groups);
    }

    function test_ZeroFeeCreditsNodeFully() public {
        vm.prank(owner);
        settlement.setFee(treasury, 0);
        _settleOne(CLIENT_PK, node, 1, 1 ether);
        assertEq(escrow.earningsOf(node), 1 ether, "no fee");
    }

    /*//////////////////////////////////////////////////////////////
                                 ADMIN
    //////////////////////////////////////////////////////////////*/

    function test_RevertWhen_FeeTooHigh() public {
        uint16 tooHigh = settlement.MAX_FEE_BPS() + 1;
        vm.expectRevert(Settlement.BadFee.selector);
        vm.prank(owner);
        settlement.setFee(treasury, tooHigh);
    }

    function test_RevertWhen_FeeRecipientZero() public {
        vm.expectRevert(Settlement.BadFee.selector);
        vm.prank(owner);
        settlement.setFee(address(0), 10);
    }

    function test_RevertWhen_SetFeeByNonOwner() public {
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, client));
        vm.prank(client);
        settlement.setFee(client, 0);
    }

    function test_RevertWhen_SetRootCommitterByNonOwner() public {
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, client));
        vm.prank(client);
        settlement.setRootCommitter(client, true);
    }

    /*//////////////////////////////////////////////////////////////
                              EIP-712 HASHES
    //////////////////////////////////////////////////////////////*/

    function test_DomainSeparatorIsNectarV1() public view {
        bytes32 expected = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("Nectar"),
                keccak256("1"),
                block.chainid,
                address(settlement)
            )
        );
        assertEq(settlement.domainSeparator(), expected, "domain");
    }

    function test_VoucherDigestMatchesProtocolString() public view {
        bytes32 structHash = keccak256(
            abi.encode(
                keccak256(
                    "Voucher(address client,address node,address partner,uint64 channelId,uint128 cumulativeAmount)"
                ),
                client,
                node,
                node2,
                uint64(5),
                uint128(9)
            )
        );
        bytes32 expected = keccak256(abi.encodePacked("\x19\x01", settlement.domainSeparator(), structHash));
        assertEq(settlement.voucherDigest(client, node, node2, 5, 9), expected, "voucher digest");
    }

    function test_ReceiptLeafIsHashOfStructHash() public view {
        Receipt memory r = _receipt(node, keccak256("s"), 3, keccak256("out"));
        bytes32 structHash = keccak256(
            bytes.concat(
                abi.encode(
                    keccak256(
                        "Receipt(bytes32 sessionId,uint64 step,uint8 kind,bytes32 modelId,uint16 blockStart,"
                        "uint16 blockEnd,address node,address client,uint32 tokens,uint128 price,uint128 amount,"
                        "bytes32 inputCommitment,bytes32 outputCommitment,bytes32 fingerprint,uint64 timestamp)"
                    ),
                    r.sessionId,
                    r.step,
                    r.kind,
                    r.modelId,
                    r.blockStart,
                    r.blockEnd
                ),
                abi.encode(r.node, r.client, r.tokens, r.price, r.amount, r.inputCommitment),
                abi.encode(r.outputCommitment, r.fingerprint, r.timestamp)
            )
        );
        assertEq(settlement.receiptLeaf(r), keccak256(abi.encode(structHash)), "leaf");
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", settlement.domainSeparator(), structHash));
        assertEq(settlement.receiptDigest(r), digest, "digest");
    }

    /*//////////////////////////////////////////////////////////////
                               EPOCH ROOTS
    //////////////////////////////////////////////////////////////*/

    function _hashPair(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        return a < b ? keccak256(abi.encodePacked(a, b)) : keccak256(abi.encodePacked(b, a));
    }

    /// @dev Three sorted leaves: (l0, l1) pair up, l2 is promoted unchanged (docs/protocol.md).
    ///      `hashes` are the receipts' struct hashes, `leaves[i] = keccak256(abi.encode(hashes[i]))`.
    function _tree() internal pure returns (bytes32[3] memory hashes, bytes32[3] memory leaves, bytes32 root) {
        hashes = [keccak256("a"), keccak256("b"), keccak256("c")];
        for (uint256 i; i < 3; ++i) {
            leaves[i] = keccak256(abi.encode(hashes[i]));
        }
        // sort ascending
        for (uint256 i; i < 3; ++i) {
            for (uint256 j = i + 1; j < 3; ++j) {
                if (leaves[j] < leaves[i]) {
                    (leaves[i], leaves[j]) = (leaves[j], leaves[i]);
                    (hashes[i], hashes[j]) = (hashes[j], hashes[i]);
                }
            }
        }
        root = _hashPair(_hashPair(leaves[0], leaves[1]), leaves[2]);
    }

    function test_CommitAndProveInclusion() public {
        (bytes32[3] memory hashes, bytes32[3] memory leaves, bytes32 root) = _tree();
        vm.expectEmit(address(settlement));
        emit EpochRootCommitted(1, root, 3, ledger);
        vm.prank(ledger);
        settlement.commitEpochRoot(1, root, 3);
        (bytes32 stored, uint32 count, uint64 at) = settlement.epochRoot(1);
        assertEq(stored, root, "root");
        assertEq(uint256(count), 3, "count");
        assertEq(uint256(at), block.timestamp, "time");

        bytes32[] memory proof = new bytes32[](2);
        proof[0] = leaves[1];
        proof[1] = leaves[2];
        assertTrue(settlement.verifyInclusion(1, hashes[0], proof), "receipt 0");
        bytes32[] memory promoted = new bytes32[](1);
        promoted[0] = _hashPair(leaves[0], leaves[1]);
        assertTrue(settlement.verifyInclusion(1, hashes[2], promoted), "promoted receipt 2");
        assertFalse(settlement.verifyInclusion(1, keccak256("d"), proof), "foreign receipt");
        assertFalse(settlement.verifyInclusion(2, hashes[0], proof), "uncommitted epoch");
    }

    /// @dev Issue 20: an inner node of the tree, offered as a leaf with the rest of a proof, used to verify
    ///      (`verifyInclusion(1, inner, [leaf 2])` returned true: failed on the old code, which took the leaf itself).
    ///      Now the caller gives the receipt's struct hash and the contract hashes it into the leaf, so an inner
    ///      node (the hash of 64 bytes) cannot pass for a leaf (the hash of 32).
    function test_Attack_InnerNodeIsNotALeaf() public {
        (, bytes32[3] memory leaves, bytes32 root) = _tree();
        vm.prank(ledger);
        settlement.commitEpochRoot(1, root, 3);
        bytes32 inner = _hashPair(leaves[0], leaves[1]);
        bytes32[] memory rest = new bytes32[](1);
        rest[0] = leaves[2];
        assertFalse(settlement.verifyInclusion(1, inner, rest), "inner node accepted as a leaf");
    }

    function test_ReceiptHashIsTheStructHash() public view {
        Receipt memory r = _receipt(node, keccak256("s"), 3, keccak256("out"));
        assertEq(keccak256(abi.encode(settlement.receiptHash(r))), settlement.receiptLeaf(r), "leaf = H(hash)");
    }

    function test_RevertWhen_CommitByStranger() public {
        vm.expectRevert(Settlement.NotRootCommitter.selector);
        vm.prank(client);
        settlement.commitEpochRoot(1, keccak256("r"), 1);
    }

    function test_RevertWhen_CommitTwice() public {
        vm.startPrank(ledger);
        settlement.commitEpochRoot(1, keccak256("r"), 1);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochAlreadyCommitted.selector, 1));
        settlement.commitEpochRoot(1, keccak256("other"), 1);
        vm.stopPrank();
    }

    function test_RevertWhen_CommitEmptyRoot() public {
        vm.startPrank(ledger);
        vm.expectRevert(Settlement.EmptyRoot.selector);
        settlement.commitEpochRoot(1, bytes32(0), 1);
        vm.expectRevert(Settlement.EmptyRoot.selector);
        settlement.commitEpochRoot(1, keccak256("r"), 0);
        vm.stopPrank();
    }

    function test_RevokedCommitterCannotCommit() public {
        vm.prank(owner);
        settlement.setRootCommitter(ledger, false);
        vm.expectRevert(Settlement.NotRootCommitter.selector);
        vm.prank(ledger);
        settlement.commitEpochRoot(1, keccak256("r"), 1);
    }
}
