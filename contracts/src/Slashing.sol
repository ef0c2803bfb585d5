// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {NodeRegistry} from "./NodeRegistry.sol";
import {Settlement} from "./Settlement.sol";
import {NectarTypes, Receipt} from "./lib/NectarTypes.sol";

/// @notice Slashes node stake in two ways. (a) Trustless double-sign proofs: two receipts signed by the same node for
///         the same work (session, step, kind, block span, model, client) and the same input commitment, with
///         different output commitments, both at most `maxEvidenceAge` old; part of the slash rewards the reporter
///         (never the node itself). (b) Failed spot checks attested by `threshold` registered verifiers; anyone can
///         finalize the slash once `disputeWindow` has passed, unless the arbiter dismissed the case.
///         A spot-check case names one receipt signed by the accused node and proven included in a final epoch root
///         (Settlement), with the hash of the verifiers' re-execution record; one receipt is one case, a node has at
///         most one open or slashed case per epoch, and an epoch at most `maxCasesPerEpoch`. While a node has an
///         open case the registry freezes its unbonding.
///         Two roles, never one key: the arbiter dismisses cases; the verifier manager adds and removes verifiers and
///         sets the threshold (on a real chain each should be a timelock or multisig).
/// @author Nectar
contract Slashing {
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

    /// @dev Fires when a caller other than the arbiter dismisses a case or hands the role on.
    error NotArbiter();

    /// @dev Fires when a caller other than the verifier manager changes verifiers, the threshold or the role.
    error NotVerifierManager();

    /// @dev Fires when a role is set to zero or to the other role's key (the arbiter must not manage verifiers).
    error BadRole();

    /// @dev Fires when a case's receipt is not in the committed root of the epoch it cites (or the proof is wrong).
    error ReceiptNotInEpoch(uint64 epoch);

    /// @dev Fires when a case cites an epoch whose root is still correctable; retry from `finalAt`.
    error EpochRootNotFinal(uint64 epoch, uint256 finalAt);

    /// @dev Fires when a case cites an epoch committed more than `maxEvidenceAge` ago.
    error EpochTooOld(uint64 epoch, uint256 committedAt);

    /// @dev Fires when the node already has a case (`existing`) citing this epoch.
    error NodeHasCaseInEpoch(address node, uint64 epoch, bytes32 existing);

    /// @dev Fires when `maxCasesPerEpoch` cases already cite this epoch.
    error EpochCaseCapReached(uint64 epoch);

    /// @dev Fires when the settlement's challenge period leaves no time to open a case before evidence expires.
    error ChallengePeriodTooLong(uint256 challengePeriod, uint256 maxEvidenceAge);

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

    /// @dev Fires when the re-execution record's hash is zero.
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

    /// @dev Emitted when a case is opened: `node`'s receipt `caseId` (its Merkle leaf) in `epoch` failed a spot check.
    event SpotCheckCaseOpened(bytes32 indexed caseId, address indexed node, uint64 indexed epoch);

    /// @dev Emitted when `verifier` attests case `caseId` against `node` (`attestations` so far), with the hash of its
    ///      re-execution record.
    event SpotCheckAttested(
        bytes32 indexed caseId, address indexed node, address indexed verifier, uint256 attestations, bytes32 recordHash
    );

    /// @dev Emitted when a case reaches the threshold; it can be finalized from `readyAt`.
    event SpotCheckCaseReady(bytes32 indexed caseId, address indexed node, uint256 readyAt);

    /// @dev Emitted when the arbiter dismisses a case during its dispute window.
    event SpotCheckDismissed(bytes32 indexed caseId, address indexed node);

    /// @dev Emitted when a spot-check case is finalized and `node` loses `amount`.
    event SpotCheckSlashed(bytes32 indexed caseId, address indexed node, uint256 amount);

    /// @dev Emitted when the verifier manager adds or removes a verifier.
    event VerifierUpdated(address indexed verifier, bool allowed);

    /// @dev Emitted when the verifier manager changes the number of attestations a case needs.
    event ThresholdUpdated(uint256 threshold);

    /// @dev Emitted when the arbiter role moves to `arbiter`.
    event ArbiterSet(address indexed arbiter);

    /// @dev Emitted when the verifier manager role moves to `manager`.
    event VerifierManagerSet(address indexed manager);

    /*//////////////////////////////////////////////////////////////
                                 STORAGE
    //////////////////////////////////////////////////////////////*/

    struct Case {
        address node;
        uint32 attestations;
        uint64 readyAt; // zero until the threshold is reached
        uint64 epoch; // the epoch whose root proves the receipt
        bool closed;
        bytes32 recordHash; // the opening verifier's re-execution record
    }

    /// @dev Slash parameters, fixed at deployment.
    struct Params {
        uint256 doubleSignSlashBps; // share of slashable stake taken for a double-sign
        uint256 reporterRewardBps; // share of a double-sign slash paid to the reporter
        uint256 spotCheckSlashBps; // share of slashable stake taken for a failed spot check
        uint256 disputeWindow; // seconds between reaching the threshold and finalization
        uint256 maxEvidenceAge; // seconds a receipt (double sign) or an epoch root (spot check) stays usable
        uint256 maxCasesPerEpoch; // spot-check cases that may cite one epoch
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
    uint256 public immutable maxCasesPerEpoch;
    /// @notice Settlement's challenge period, copied (it is immutable there): roots are final after it.
    uint256 public immutable challengePeriod;

    /// @notice Attestations a spot-check case needs (k of the n verifiers).
    uint256 public threshold;

    /// @notice Dismisses cases. Never the verifier manager.
    address public arbiter;

    /// @notice Adds and removes verifiers and sets the threshold. Never the arbiter.
    address public verifierManager;

    mapping(address => bool) public isVerifier;
    mapping(bytes32 doubleSignKey => bool) public evidenceUsed;
    mapping(bytes32 caseId => Case) internal _cases;
    mapping(bytes32 caseId => mapping(address verifier => bool)) public hasAttested;
    mapping(bytes32 caseId => address[]) internal _attesters;

    /// @notice Number of open (attested, neither finalized nor dismissed) spot-check cases of each node.
    mapping(address node => uint256) public openCases;

    /// @notice The case of `node` citing `epoch` (zero if none). An open or slashed case keeps its place, so a node
    ///         is charged at most once per epoch; a dismissed one gives it up, so a bogus case (e.g. by a rogue
    ///         verifier) cannot shield a cheater for the rest of the epoch once the arbiter throws it out.
    mapping(address node => mapping(uint64 epoch => bytes32 caseId)) public caseOf;

    /// @notice Number of open or slashed cases citing each epoch (at most `maxCasesPerEpoch`).
    mapping(uint64 epoch => uint256) public casesInEpoch;

    /*//////////////////////////////////////////////////////////////
                               CONSTRUCTOR
    //////////////////////////////////////////////////////////////*/

    /// @param registry_ The stake registry (it must name this contract as slasher).
    /// @param settlement_ Source of the EIP-712 receipt digest (one domain for receipts and vouchers) and of the
    ///        epoch roots cases cite.
    /// @param arbiter_ Dismisses cases.
    /// @param verifierManager_ Manages verifiers and the threshold; must differ from `arbiter_`.
    /// @param threshold_ k: attestations a spot-check case needs.
    /// @param p Slash shares, the dispute window, evidence age and the per-epoch case cap.
    constructor(
        NodeRegistry registry_,
        Settlement settlement_,
        address arbiter_,
        address verifierManager_,
        uint256 threshold_,
        Params memory p
    ) {
        if (
            p.doubleSignSlashBps > 10_000 || p.reporterRewardBps > 10_000 || p.spotCheckSlashBps > 10_000
                || p.disputeWindow > MAX_DELAY || p.maxEvidenceAge == 0 || p.maxEvidenceAge > MAX_DELAY
                || p.maxCasesPerEpoch == 0
        ) revert BadParameter();
        uint256 minimum = p.maxEvidenceAge + p.disputeWindow + UNBOND_MARGIN;
        uint256 unbondDelay = registry_.unbondDelay();
        if (unbondDelay <= minimum) revert UnbondDelayTooShort(unbondDelay, minimum);
        // a root becomes citable after the challenge period and stops being so at maxEvidenceAge: leave a margin
        uint256 period = settlement_.challengePeriod();
        if (period + UNBOND_MARGIN > p.maxEvidenceAge) revert ChallengePeriodTooLong(period, p.maxEvidenceAge);
        if (arbiter_ == address(0) || verifierManager_ == address(0) || arbiter_ == verifierManager_) revert BadRole();
        registry = registry_;
        settlement = settlement_;
        doubleSignSlashBps = p.doubleSignSlashBps;
        reporterRewardBps = p.reporterRewardBps;
        spotCheckSlashBps = p.spotCheckSlashBps;
        disputeWindow = p.disputeWindow;
        maxEvidenceAge = p.maxEvidenceAge;
        maxCasesPerEpoch = p.maxCasesPerEpoch;
        challengePeriod = period;
        arbiter = arbiter_;
        verifierManager = verifierManager_;
        emit ArbiterSet(arbiter_);
        emit VerifierManagerSet(verifierManager_);
        _setThreshold(threshold_);
    }

    modifier onlyArbiter() {
        if (msg.sender != arbiter) revert NotArbiter();
        _;
    }

    modifier onlyVerifierManager() {
        if (msg.sender != verifierManager) revert NotVerifierManager();
        _;
    }

    /*//////////////////////////////////////////////////////////////
                                INTERNAL
    //////////////////////////////////////////////////////////////*/

    function _setThreshold(uint256 k) internal {
        if (k == 0) revert BadParameter();
        threshold = k;
        emit ThresholdUpdated(k);
    }

    /// @dev Opens the case of receipt `r` (leaf `id`) citing `epoch`, after checking everything a verifier could lie
    ///      about without help from the node or the committer: the node signed `r`, `r` is in `epoch`'s final root,
    ///      that root is recent, and neither this node's slot for the epoch nor the epoch's cap is taken.
    function _open(
        bytes32 id,
        uint64 epoch,
        Receipt calldata r,
        bytes calldata signature,
        bytes32[] calldata proof,
        bytes32 recordHash
    ) internal {
        address node = r.node;
        if (node == address(0) || !_signedByNode(r, signature)) revert InvalidReceiptSignature();
        (,, uint64 committedAt) = settlement.epochRoot(epoch);
        if (committedAt == 0) revert ReceiptNotInEpoch(epoch);
        // forge-lint: disable-next-line(block-timestamp) -- challenge periods and evidence ages are hours
        if (block.timestamp < uint256(committedAt) + challengePeriod) {
            revert EpochRootNotFinal(epoch, uint256(committedAt) + challengePeriod);
        }
        // forge-lint: disable-next-line(block-timestamp) -- as above
        if (block.timestamp - committedAt > maxEvidenceAge) revert EpochTooOld(epoch, committedAt);
        if (!settlement.verifyInclusion(epoch, NectarTypes.hash(r), proof)) revert ReceiptNotInEpoch(epoch);
        bytes32 existing = caseOf[node][epoch];
        if (existing != bytes32(0)) revert NodeHasCaseInEpoch(node, epoch, existing);
        if (casesInEpoch[epoch] >= maxCasesPerEpoch) revert EpochCaseCapReached(epoch);
        caseOf[node][epoch] = id;
        ++casesInEpoch[epoch];
        ++openCases[node];
        Case storage c = _cases[id];
        c.node = node;
        c.epoch = epoch;
        c.recordHash = recordHash;
        emit SpotCheckCaseOpened(id, node, epoch);
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
        --openCases[c.node]; // every existing case was opened, which counted it
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

    /// @notice A verifier attests that receipt `receipt`, signed by its node (`signature`, 65-byte EIP-712) and
    ///         included in the final root of `epoch` (`proof`, see Settlement.verifyInclusion), failed a spot check;
    ///         `recordHash` is the hash of the verifier's re-execution record (kept off chain for the arbiter). The
    ///         first attestation opens the case (id: the receipt's Merkle leaf, so one receipt is one case); later
    ///         ones by other verifiers add to it (their `epoch`, `signature` and `proof` are not re-checked). The node's
    ///         unbonding is frozen until the case is finalized or dismissed.
    /// @dev Verifiers only (`NotVerifier`). Reverts with `EmptyEvidence`, `CaseClosed` or `AlreadyAttested`, and when
    ///      opening with `InvalidReceiptSignature`, `ReceiptNotInEpoch`, `EpochRootNotFinal`, `EpochTooOld`,
    ///      `NodeHasCaseInEpoch` or `EpochCaseCapReached`.
    function attestSpotCheckFailure(
        uint64 epoch,
        Receipt calldata receipt,
        bytes calldata signature,
        bytes32[] calldata proof,
        bytes32 recordHash
    ) external returns (bytes32 id) {
        if (!isVerifier[msg.sender]) revert NotVerifier();
        if (recordHash == bytes32(0)) revert EmptyEvidence();
        id = caseId(receipt);
        Case storage c = _cases[id];
        if (c.closed) revert CaseClosed();
        if (hasAttested[id][msg.sender]) revert AlreadyAttested();
        if (c.node == address(0)) _open(id, epoch, receipt, signature, proof, recordHash);
        address node = c.node;
        hasAttested[id][msg.sender] = true;
        _attesters[id].push(msg.sender);
        uint32 count = ++c.attestations;
        emit SpotCheckAttested(id, node, msg.sender, count, recordHash);
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

    /// @notice The arbiter throws out case `id` (e.g. the node proved the verifiers wrong) before it is finalized. The
    ///         node's place for that epoch and the epoch's cap slot are freed; the receipt itself stays closed.
    /// @dev Arbiter only (`NotArbiter`); reverts with `CaseClosed` (also for a case that was never opened).
    function dismissCase(bytes32 id) external onlyArbiter {
        Case storage c = _cases[id];
        if (c.closed || c.node == address(0)) revert CaseClosed();
        _close(c);
        delete caseOf[c.node][c.epoch];
        --casesInEpoch[c.epoch];
        emit SpotCheckDismissed(id, c.node);
    }

    /// @notice Adds or removes a spot-check verifier.
    /// @dev Verifier manager only (`NotVerifierManager`).
    function setVerifier(address verifier, bool allowed) external onlyVerifierManager {
        isVerifier[verifier] = allowed;
        emit VerifierUpdated(verifier, allowed);
    }

    /// @notice Sets k, the attestations a case needs.
    /// @dev Verifier manager only (`NotVerifierManager`); reverts with `BadParameter` for zero.
    function setThreshold(uint256 k) external onlyVerifierManager {
        _setThreshold(k);
    }

    /// @notice Hands the arbiter role to `arbiter_` (not the verifier manager, not zero).
    /// @dev Arbiter only (`NotArbiter`); reverts with `BadRole`.
    function setArbiter(address arbiter_) external onlyArbiter {
        if (arbiter_ == address(0) || arbiter_ == verifierManager) revert BadRole();
        arbiter = arbiter_;
        emit ArbiterSet(arbiter_);
    }

    /// @notice Hands the verifier manager role to `manager` (not the arbiter, not zero).
    /// @dev Verifier manager only (`NotVerifierManager`); reverts with `BadRole`.
    function setVerifierManager(address manager) external onlyVerifierManager {
        if (manager == address(0) || manager == arbiter) revert BadRole();
        verifierManager = manager;
        emit VerifierManagerSet(manager);
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC READS
    //////////////////////////////////////////////////////////////*/

    /// @notice True while `node` has an open spot-check case (the registry freezes its unbonding meanwhile).
    function hasOpenCase(address node) external view returns (bool) {
        return openCases[node] != 0;
    }

    /// @notice The id of the spot-check case on `receipt`: its Merkle leaf, keccak256(hashStruct(receipt)).
    function caseId(Receipt calldata receipt) public pure returns (bytes32) {
        return keccak256(abi.encode(NectarTypes.hash(receipt)));
    }

    /// @notice State of case `id`: node, attestations, readyAt (0 until threshold), closed, the epoch it cites and
    ///         the opening verifier's re-execution record hash.
    function caseInfo(bytes32 id)
        external
        view
        returns (address node, uint256 attestations, uint256 readyAt, bool closed, uint64 epoch, bytes32 recordHash)
    {
        Case storage c = _cases[id];
        return (c.node, c.attestations, c.readyAt, c.closed, c.epoch, c.recordHash);
    }
}
