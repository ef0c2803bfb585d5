// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {NodeRegistry} from "../../src/NodeRegistry.sol";
import {Settlement} from "../../src/Settlement.sol";
import {Slashing} from "../../src/Slashing.sol";
import {Receipt} from "../../src/lib/NectarTypes.sol";
import {NectarFixture} from "../utils/NectarFixture.sol";

/// @notice Drives epoch commits, spot-check attestations, dismissals, finalizations, verifier changes and time for the
///         Slashing invariants, against a model of what each call should do: every call is made in try/catch and
///         the handler asserts that it succeeded exactly when the model says it may (so no call reverts the run).
/// @author Nectar
contract SlashingHandler is NectarFixture {
    uint256 public constant NODES = 4;
    uint256 public constant PER_NODE = 2; // receipts of each node in each epoch
    uint256 public constant STAKE = 1_000 ether;

    enum Status {
        None,
        Open,
        Slashed,
        Dismissed
    }

    struct GhostCase {
        Status status;
        uint256 node;
        uint64 epoch;
        uint256 attestations;
    }

    uint256[NODES] internal _keys = [uint256(0x1001), 0x1002, 0x1003, 0x1004];
    address[2] internal _verifiers = [address(0x7E41), address(0x7E42)];

    uint64[] public epochs; // committed epochs
    mapping(uint64 epoch => uint64) internal _stamp; // receipts' timestamp in that epoch
    bytes32[] public caseIds;
    mapping(bytes32 id => GhostCase) public ghost;
    mapping(bytes32 id => mapping(uint256 verifier => bool)) internal _attested;
    mapping(uint256 node => mapping(uint64 epoch => bytes32)) public ghostCaseOf;
    mapping(uint64 epoch => uint256) public ghostInEpoch;
    mapping(uint256 node => uint256) public ghostOpen;
    mapping(uint256 node => mapping(uint64 epoch => uint256)) public slashesIn;
    bool[2] public active = [true, false];

    constructor() {
        setUp();
        for (uint256 i; i < NODES; ++i) {
            _register(vm.addr(_keys[i]), STAKE);
        }
    }

    function slashingContract() external view returns (Slashing) {
        return slashing;
    }

    function registryContract() external view returns (NodeRegistry) {
        return registry;
    }

    function nodeAddress(uint256 i) external view returns (address) {
        return vm.addr(_keys[i]);
    }

    function epochCount() external view returns (uint256) {
        return epochs.length;
    }

    function caseCount() external view returns (uint256) {
        return caseIds.length;
    }

    /*//////////////////////////////////////////////////////////////
                                 HELPERS
    //////////////////////////////////////////////////////////////*/

    function _receiptOf(uint64 epoch, uint256 n, uint256 j) internal view returns (Receipt memory r) {
        r = _receipt(vm.addr(_keys[n]), keccak256(abi.encode(epoch, n)), uint64(j), keccak256(abi.encode(epoch, n, j)));
        r.timestamp = _stamp[epoch];
    }

    function _epochReceipts(uint64 epoch) internal view returns (Receipt[] memory all) {
        all = new Receipt[](NODES * PER_NODE);
        for (uint256 n; n < NODES; ++n) {
            for (uint256 j; j < PER_NODE; ++j) {
                all[n * PER_NODE + j] = _receiptOf(epoch, n, j);
            }
        }
    }

    /*//////////////////////////////////////////////////////////////
                                 ACTIONS
    //////////////////////////////////////////////////////////////*/

    function commit() external {
        uint64 epoch = settlement.latestEpoch() + 1;
        _stamp[epoch] = uint64(block.timestamp);
        _commitEpoch(_epochReceipts(epoch));
        epochs.push(epoch);
    }

    function warp(uint256 seconds_) external {
        vm.warp(block.timestamp + bound(seconds_, 0, 2 * DISPUTE_WINDOW));
    }

    function setVerifier(uint256 which, bool allowed) external {
        which %= 2;
        vm.prank(manager);
        slashing.setVerifier(_verifiers[which], allowed);
        active[which] = allowed;
    }

    function _evidence(uint64 epoch, uint256 node, uint256 j)
        internal
        view
        returns (Receipt memory r, bytes memory sig, bytes32[] memory proof)
    {
        Receipt[] memory all = _epochReceipts(epoch);
        r = all[node * PER_NODE + j];
        bytes32[] memory leaves = new bytes32[](all.length);
        for (uint256 i; i < all.length; ++i) {
            leaves[i] = _leaf(all[i]);
        }
        (, proof) = _merkle(leaves, node * PER_NODE + j);
        sig = _signReceipt(_keys[node], r);
    }

    /// @dev What the model says an attestation of case `id` (node `node`, citing `epoch`) by verifier `which` does.
    function _mayAttest(bytes32 id, uint64 epoch, uint256 node, uint256 which) internal view returns (bool) {
        GhostCase storage g = ghost[id];
        if (!active[which] || _attested[id][which]) return false;
        if (g.status == Status.Open) return true;
        if (g.status != Status.None) return false;
        (,, uint64 committedAt) = settlement.epochRoot(epoch);
        return block.timestamp >= committedAt + CHALLENGE_PERIOD && block.timestamp - committedAt <= MAX_EVIDENCE_AGE
            && ghostCaseOf[node][epoch] == bytes32(0) && ghostInEpoch[epoch] < MAX_CASES_PER_EPOCH;
    }

    function attest(uint256 epochIndex, uint256 node, uint256 j, uint256 which) external {
        if (epochs.length == 0) return;
        uint64 epoch = epochs[epochIndex % epochs.length];
        node %= NODES;
        which %= 2;
        (Receipt memory r, bytes memory sig, bytes32[] memory proof) = _evidence(epoch, node, j % PER_NODE);
        bytes32 id = _leaf(r);
        bool ok = _mayAttest(id, epoch, node, which);
        vm.prank(_verifiers[which]);
        try slashing.attestSpotCheckFailure(epoch, r, sig, proof, keccak256("record")) returns (bytes32 got) {
            assertTrue(ok, "attestation the model refuses went through");
            assertEq(got, id, "case id");
        } catch {
            assertFalse(ok, "attestation the model allows reverted");
            return;
        }
        GhostCase storage g = ghost[id];
        if (g.status == Status.None) {
            caseIds.push(id);
            g.status = Status.Open;
            g.node = node;
            g.epoch = epoch;
            ghostCaseOf[node][epoch] = id;
            ++ghostInEpoch[epoch];
            ++ghostOpen[node];
        }
        _attested[id][which] = true;
        ++g.attestations;
    }

    function dismiss(uint256 index) external {
        if (caseIds.length == 0) return;
        bytes32 id = caseIds[index % caseIds.length];
        GhostCase storage g = ghost[id];
        vm.prank(arbiter);
        try slashing.dismissCase(id) {
            assertTrue(g.status == Status.Open, "dismissed a closed case");
        } catch {
            assertTrue(g.status != Status.Open, "could not dismiss an open case");
            return;
        }
        g.status = Status.Dismissed;
        delete ghostCaseOf[g.node][g.epoch];
        --ghostInEpoch[g.epoch];
        --ghostOpen[g.node];
    }

    function finalize(uint256 index) external {
        if (caseIds.length == 0) return;
        bytes32 id = caseIds[index % caseIds.length];
        GhostCase storage g = ghost[id];
        (,, uint256 readyAt,,,) = slashing.caseInfo(id);
        uint256 stillActive = (_attested[id][0] && active[0] ? 1 : 0) + (_attested[id][1] && active[1] ? 1 : 0);
        bool ok = g.status == Status.Open && readyAt != 0 && block.timestamp >= readyAt && stillActive >= 1;
        try slashing.finalizeSlash(id) {
            assertTrue(ok, "finalized a case the model refuses");
        } catch {
            assertFalse(ok, "could not finalize a ready case");
            return;
        }
        g.status = Status.Slashed;
        --ghostOpen[g.node];
        ++slashesIn[g.node][g.epoch];
    }
}
