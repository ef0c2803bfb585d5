// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {NodeRegistry} from "./NodeRegistry.sol";
import {Settlement} from "./Settlement.sol";
import {Receipt} from "./lib/NectarTypes.sol";

/// @notice Slashes node stake in two ways. (a) Trustless double-sign proofs: two receipts signed by the same node for
///         the same work (session, step, kind, block span, model, client) and the same input commitment, with
///         different output commitments, both at most `maxEvidenceAge` old; part of the slash rewards the reporter
///         (never the node itself). While a node has an open spot-check case the registry freezes its unbonding. (b) Failed spot checks attested by `threshold` registered verifiers; anyone can
///         finalize the slash once `disputeWindow` has passed, unless the owner (the arbiter) dismissed the case.
/// @author Nectar
contract Slashing is Ownable {
    /*//////////////////////////////////////////////////////////////
                                 ERRORS
    //////////////////////////////////////////////////////////////*/

    /// @dev Fires when the two receipts are not by one node for the same work (session, step, kind, block span)
    ///      with different outputs.
    error ReceiptsDoNotConflict();

    /// @dev Fires when a receipt's signature does not recover to the receipt's node.
    error InvalidReceiptSignature();

    /// @dev Fires when a double-sign of this work (node, session, step, kind, span) was already slashed.
    error EvidenceAlreadyUsed();

    /// @dev Fires when a caller that is not a registered verifier attests.
    error NotVerifier();

    /// @dev Fires when a verifier attests the same case twice.
    error AlreadyAttested();

    /// @dev Fires when a case is finalized before `threshold` verifiers attested it.
    error CaseNotReady();

    /// @dev Fires when a case is finalized before its dispute window ends.
    error DisputeWindowOpen(uint256 readyAt);

    /// @dev Fires when a case was already slashed or dismissed.
    error CaseClosed();

    /// @dev Fires when a threshold of zero or basis points above 10,000 are configured.
    error BadParameter();

    /// @dev Fires when the evidence is empty.
    error EmptyEvidence();

    /// @dev Fires when a double-sign receipt's timestamp is older than `maxEvidenceAge` (or in the future).
    error EvidenceTooOld(uint256 timestamp);

    /// @dev Fires when the registry's unbond delay does not exceed evidence age + dispute window + margin, so a
    ///      node could take its stake out before a slash reaches it.
    error UnbondDelayTooShort(uint256 unbondDelay, uint256 minimum);

    /*//////////////////////////////////////////////////////////////
                                 EVENTS
    //////////////////////////////////////////////////////////////*/

    /// @dev Emitted when a double-sign by `node` at (`sessionId`, `step`) is slashed `amount`, `reward` to `reporter`.
    event DoubleSignSlashed(
        address indexed node, address indexed reporter, bytes32 sessionId, uint64 step, uint256 amount, uint256 reward
    );

    /// @dev Emitted when `verifier` attests a failed spot check of `node` (case `caseId`, `attestations` so far).
    event SpotCheckAttested(
        bytes32 indexed caseId, address indexed node, address indexed verifier, uint256 attestations, bytes evidence
    );

    /// @dev Emitted when a case reaches the threshold; it can be finalized from `readyAt`.
    event SpotCheckCaseReady(bytes32 indexed caseId, address indexed node, uint256 readyAt);

    /// @dev Emitted when the owner dismisses a case during its dispute window.
    event SpotCheckDismissed(bytes32 indexed caseId, address indexed node);

    /// @dev Emitted when a spot-check case is finalized and `node` loses `amount`.
    event SpotCheckSlashed(bytes32 indexed caseId, address indexed node, uint256 amount);

    /// @dev Emitted when the owner adds or removes a verifier.
    event VerifierUpdated(address indexed verifier, bool allowed);

    /// @dev Emitted when the owner changes the number of attestations a case needs.
    event ThresholdUpdated(uint256 threshold);

    /*//////////////////////////////////////////////////////////////
                                 STORAGE
    //////////////////////////////////////////////////////////////*/

    struct Case {
        address node;
        uint32 attestations;
        uint64 readyAt; // zero until the threshold is reached
        bool closed;
    }

    /// @dev Slash parameters, fixed at deployment.
    struct Params {
        uint256 doubleSignSlashBps; // share of slashable stake taken for a double-sign
        uint256 reporterRewardBps; // share of a double-sign slash paid to the reporter
        uint256 spotCheckSlashBps; // share of slashable stake taken for a failed spot check
        uint256 disputeWindow; // seconds between reaching the threshold and finalization
        uint256 maxEvidenceAge; // seconds a receipt stays usable as double-sign evidence
    }

    /// @notice Slack the registry's unbond delay must keep above `maxEvidenceAge + disputeWindow`.
    uint256 public constant UNBOND_MARGIN = 1 hours;

    /// @notice Longest dispute window or evidence age accepted (keeps timestamps far from truncation).
    uint256 public constant MAX_DELAY = 365 days;

    NodeRegistry public immutable registry;
    Settlement public immutable settlement;
    uint256 public immutable doubleSignSlashBps;
    uint256 public immutable reporterRewardBps;
    uint256 public immutable spotCheckSlashBps;
    uint256 public immutable disputeWindow;
    uint256 public immutable maxEvidenceAge;

    /// @notice Attestations a spot-check case needs (k of the n verifiers).
    uint256 public threshold;

    mapping(address => bool) public isVerifier;
    mapping(bytes32 doubleSignKey => bool) public evidenceUsed;
    mapping(bytes32 caseId => Case) internal _cases;
    mapping(bytes32 caseId => mapping(address verifier => bool)) public hasAttested;
    mapping(bytes32 caseId => address[]) internal _attesters;

    /// @notice Number of open (attested, neither finalized nor dismissed) spot-check cases of each node.
    mapping(address node => uint256) public openCases;

    /*//////////////////////////////////////////////////////////////
                               CONSTRUCTOR
    //////////////////////////////////////////////////////////////*/

    /// @param registry_ The stake registry (it must name this contract as slasher).
    /// @param settlement_ Source of the EIP-712 receipt digest (one domain for receipts and vouchers).
    /// @param owner_ Manages verifiers and the threshold; arbiter of disputes.
    /// @param threshold_ k: attestations a spot-check case needs.
    /// @param p Slash shares and the dispute window.
    constructor(NodeRegistry registry_, Settlement settlement_, address owner_, uint256 threshold_, Params memory p)
        Ownable(owner_)
    {
        if (
            p.doubleSignSlashBps > 10_000 || p.reporterRewardBps > 10_000 || p.spotCheckSlashBps > 10_000
                || p.disputeWindow > MAX_DELAY || p.maxEvidenceAge == 0 || p.maxEvidenceAge > MAX_DELAY
        ) revert BadParameter();
        uint256 minimum = p.maxEvidenceAge + p.disputeWindow + UNBOND_MARGIN;
        uint256 unbondDelay = registry_.unbondDelay();
        if (unbondDelay <= minimum) revert UnbondDelayTooShort(unbondDelay, minimum);
        registry = registry_;
        settlement = settlement_;
        doubleSignSlashBps = p.doubleSignSlashBps;
        reporterRewardBps = p.reporterRewardBps;
        spotCheckSlashBps = p.spotCheckSlashBps;
        disputeWindow = p.disputeWindow;
        maxEvidenceAge = p.maxEvidenceAge;
        _setThreshold(threshold_);
    }

    /*//////////////////////////////////////////////////////////////
                                INTERNAL
    //////////////////////////////////////////////////////////////*/

    function _setThreshold(uint256 k) internal {
        if (k == 0) revert BadParameter();
        threshold = k;
        emit ThresholdUpdated(k);
    }

    function _signedByNode(Receipt calldata r, bytes calldata signature) internal view returns (bool) {
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(settlement.receiptDigest(r), signature);
        return err == ECDSA.RecoverError.NoError && signer == r.node;
    }

    function _checkAge(uint64 timestamp) internal view {
        // forge-lint: disable-next-line(block-timestamp) -- evidence ages are hours, far above any validator skew
        if (timestamp > block.timestamp || block.timestamp - timestamp > maxEvidenceAge) {
            revert EvidenceTooOld(timestamp);
        }
    }

    function _close(Case storage c) internal {
        c.closed = true;
        if (c.attestations != 0) --openCases[c.node];
    }

    /// @dev Attesters of case `id` that are still verifiers now.
    function _activeAttestations(bytes32 id) internal view returns (uint256 active) {
        address[] storage attesters = _attesters[id];
        for (uint256 i; i < attesters.length; ++i) {
            if (isVerifier[attesters[i]]) ++active;
        }
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC WRITES
    //////////////////////////////////////////////////////////////*/

    /// @notice Proves a double-sign: receipts `a` and `b` by one node for the same work (sessionId, step, kind,
    ///         blockStart, blockEnd, modelId, client) on the same inputCommitment with different outputCommitment,
    ///         each with the node's 65-byte EIP-712 signature and at most `maxEvidenceAge` old. Slashes
    ///         `doubleSignSlashBps` of the node's slashable stake and pays `reporterRewardBps` of that to the caller,
    ///         unless the caller is the node itself (then all of it goes to the treasury).
    /// @dev Reverts with `ReceiptsDoNotConflict`, `EvidenceTooOld`, `InvalidReceiptSignature` or
    ///      `EvidenceAlreadyUsed`. Two receipts for different inputs under one (session, step) are not proof: a
    ///      client can send them, and an honest node answers both.
    function slashDoubleSign(Receipt calldata a, bytes calldata sigA, Receipt calldata b, bytes calldata sigB)
        external
        returns (uint256 slashed)
    {
        // Same work means the whole receipt key of nectar.wire: a forward and a backward pass at one step, or two
        // spans, legitimately differ.
        if (
            a.node != b.node || a.node == address(0) || a.sessionId != b.sessionId || a.step != b.step
                || a.kind != b.kind || a.blockStart != b.blockStart || a.blockEnd != b.blockEnd
                || a.modelId != b.modelId || a.client != b.client || a.inputCommitment != b.inputCommitment
                || a.outputCommitment == b.outputCommitment
        ) revert ReceiptsDoNotConflict();
        _checkAge(a.timestamp);
        _checkAge(b.timestamp);
        if (!_signedByNode(a, sigA) || !_signedByNode(b, sigB)) revert InvalidReceiptSignature();
        bytes32 key = keccak256(abi.encode(a.node, a.sessionId, a.step, a.kind, a.blockStart, a.blockEnd));
        if (evidenceUsed[key]) revert EvidenceAlreadyUsed();
        evidenceUsed[key] = true;
        uint256 amount = registry.slashableOf(a.node) * doubleSignSlashBps / 10_000;
        uint256 reward = msg.sender == a.node ? 0 : amount * reporterRewardBps / 10_000;
        slashed = registry.slash(a.node, amount, msg.sender, reward);
        emit DoubleSignSlashed(a.node, msg.sender, a.sessionId, a.step, slashed, reward);
    }

    /// @notice A verifier attests that `node` failed the spot check described by `evidence` (opaque bytes: the
    ///         ledger's re-execution record). The case is keyed by (node, keccak256(evidence)).
    ///         The node's unbonding is frozen until the case is finalized or dismissed.
    /// @dev Verifiers only (`NotVerifier`); reverts with `EmptyEvidence`, `AlreadyAttested` or `CaseClosed`.
    function attestSpotCheckFailure(address node, bytes calldata evidence) external returns (bytes32 id) {
        if (!isVerifier[msg.sender]) revert NotVerifier();
        if (evidence.length == 0) revert EmptyEvidence();
        id = caseId(node, evidence);
        Case storage c = _cases[id];
        if (c.closed) revert CaseClosed();
        if (hasAttested[id][msg.sender]) revert AlreadyAttested();
        if (c.attestations == 0) {
            ++openCases[node];
            c.node = node;
        }
        hasAttested[id][msg.sender] = true;
        _attesters[id].push(msg.sender);
        uint32 count = ++c.attestations;
        emit SpotCheckAttested(id, node, msg.sender, count, evidence);
        if (c.readyAt == 0 && count >= threshold) {
            uint256 readyAt = block.timestamp + disputeWindow;
            // forge-lint: disable-next-line(unsafe-typecast) -- timestamps fit 64 bits
            c.readyAt = uint64(readyAt);
            emit SpotCheckCaseReady(id, node, readyAt);
        }
    }

    /// @notice Slashes `spotCheckSlashBps` of the node's stake for case `id`, once its dispute window has passed.
    ///         Anyone may call it; the slash goes to the treasury. Only attesters that are still verifiers count,
    ///         and they must still reach the current threshold.
    /// @dev Reverts with `CaseNotReady`, `DisputeWindowOpen(readyAt)` or `CaseClosed`.
    function finalizeSlash(bytes32 id) external returns (uint256 slashed) {
        Case storage c = _cases[id];
        if (c.closed) revert CaseClosed();
        if (c.readyAt == 0) revert CaseNotReady();
        // forge-lint: disable-next-line(block-timestamp) -- dispute windows are hours, far above any validator skew
        if (block.timestamp < c.readyAt) revert DisputeWindowOpen(c.readyAt);
        if (_activeAttestations(id) < threshold) revert CaseNotReady();
        _close(c);
        uint256 amount = registry.slashableOf(c.node) * spotCheckSlashBps / 10_000;
        slashed = registry.slash(c.node, amount, address(0), 0);
        emit SpotCheckSlashed(id, c.node, slashed);
    }

    /// @notice The arbiter throws out case `id` (e.g. the node proved the verifiers wrong) before it is finalized.
    /// @dev Owner only; reverts with `CaseClosed`.
    function dismissCase(bytes32 id) external onlyOwner {
        Case storage c = _cases[id];
        if (c.closed) revert CaseClosed();
        _close(c);
        emit SpotCheckDismissed(id, c.node);
    }

    /// @notice Adds or removes a spot-check verifier.
    /// @dev Owner only.
    function setVerifier(address verifier, bool allowed) external onlyOwner {
        isVerifier[verifier] = allowed;
        emit VerifierUpdated(verifier, allowed);
    }

    /// @notice Sets k, the attestations a case needs.
    /// @dev Owner only; reverts with `BadParameter` for zero.
    function setThreshold(uint256 k) external onlyOwner {
        _setThreshold(k);
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC READS
    //////////////////////////////////////////////////////////////*/

    /// @notice True while `node` has an open spot-check case (the registry freezes its unbonding meanwhile).
    function hasOpenCase(address node) external view returns (bool) {
        return openCases[node] != 0;
    }

    /// @notice The id of the spot-check case of `node` with `evidence`.
    function caseId(address node, bytes calldata evidence) public pure returns (bytes32) {
        return keccak256(abi.encode(node, keccak256(evidence)));
    }

    /// @notice State of case `id`: node, attestations, readyAt (0 until threshold), closed.
    function caseInfo(bytes32 id)
        external
        view
        returns (address node, uint256 attestations, uint256 readyAt, bool closed)
    {
        Case storage c = _cases[id];
        return (c.node, c.attestations, c.readyAt, c.closed);
    }
}
