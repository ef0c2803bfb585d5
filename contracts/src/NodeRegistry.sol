// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @notice What the registry asks the slasher before stake leaves: whether `node` has an open spot-check case.
interface ICaseBook {
    function hasOpenCase(address node) external view returns (bool);
}

/// @notice Nodes register their Ethereum address and P2P peer id and bond a stake in credits. Unbonding waits
///         `unbondDelay`, and stake (bonded or unbonding) can be slashed by the Slashing contract.
/// @author Nectar
contract NodeRegistry is Ownable {
    using SafeERC20 for IERC20;

    /*//////////////////////////////////////////////////////////////
                                 ERRORS
    //////////////////////////////////////////////////////////////*/

    /// @dev Fires when an address registers twice.
    error AlreadyRegistered();

    /// @dev Fires when a call needs a registered node and the caller is not one.
    error NotRegistered();

    /// @dev Fires when the peer id is empty or longer than `MAX_PEER_ID_LENGTH` bytes.
    error BadPeerId();

    /// @dev Fires when registration bonds less than `minStake`.
    error StakeBelowMinimum(uint256 stake, uint256 minimum);

    /// @dev Fires when an amount that must be positive is zero.
    error ZeroAmount();

    /// @dev Fires when a node asks to unbond more than its bonded stake.
    error InsufficientStake(uint256 requested, uint256 bonded);

    /// @dev Fires when `unbond` finds nothing unbonding.
    error NothingUnbonding();

    /// @dev Fires when `unbond` is called before the unbonding request matures.
    error UnbondLocked(uint256 unlockAt);

    /// @dev Fires when someone other than the slasher calls `slash`.
    error NotSlasher();

    /// @dev Fires when the owner sets the slasher twice or to zero.
    error SlasherAlreadySet();

    /// @dev Fires when the treasury is the zero address.
    error ZeroTreasury();

    /// @dev Fires when the unbond delay is zero or above `MAX_UNBOND_DELAY`.
    error BadUnbondDelay();

    /// @dev Fires when a node with an open spot-check case tries to unbond: its stake stays until the case closes.
    error UnbondFrozen();

    /*//////////////////////////////////////////////////////////////
                                 EVENTS
    //////////////////////////////////////////////////////////////*/

    /// @dev Emitted when `node` registers with `peerId` and bonds `stake`.
    event NodeRegistered(address indexed node, string peerId, uint256 stake);

    /// @dev Emitted when `node` changes its peer id.
    event PeerIdUpdated(address indexed node, string peerId);

    /// @dev Emitted when `node` adds `amount` to its bonded stake, now `bonded`.
    event StakeAdded(address indexed node, uint256 amount, uint256 bonded);

    /// @dev Emitted when `node` starts unbonding `amount`, withdrawable from `unlockAt`.
    event UnbondRequested(address indexed node, uint256 amount, uint256 unlockAt);

    /// @dev Emitted when `node` takes back `amount` of unbonded stake.
    event Unbonded(address indexed node, uint256 amount);

    /// @dev Emitted when `node` loses `amount` of stake: `reward` to `reporter`, the rest to the treasury.
    event Slashed(address indexed node, uint256 amount, address indexed reporter, uint256 reward);

    /// @dev Emitted once, when the owner wires the Slashing contract.
    event SlasherSet(address indexed slasher);

    /*//////////////////////////////////////////////////////////////
                                 STORAGE
    //////////////////////////////////////////////////////////////*/

    struct Node {
        bool registered;
        uint64 unlockAt; // when the unbonding amount becomes withdrawable
        uint128 bonded;
        uint128 unbonding; // still slashable until withdrawn
        string peerId;
    }

    uint256 public constant MAX_PEER_ID_LENGTH = 128;

    /// @notice Longest unbond delay accepted (keeps `unlockAt` far from truncation).
    uint256 public constant MAX_UNBOND_DELAY = 365 days;

    IERC20 public immutable credits;

    /// @notice Smallest stake a node may register with.
    uint256 public immutable minStake;

    /// @notice Seconds between `requestUnbond` and `unbond`.
    uint256 public immutable unbondDelay;

    /// @notice Receives slashed stake (less the reporter's reward).
    address public immutable treasury;

    /// @notice The only contract allowed to slash.
    address public slasher;

    mapping(address node => Node) internal _nodes;

    /// @notice Every address that ever registered, in order (for indexers and the devnet UI).
    address[] public nodeList;

    /*//////////////////////////////////////////////////////////////
                               CONSTRUCTOR
    //////////////////////////////////////////////////////////////*/

    /// @param credits_ The token stakes are bonded in.
    /// @param minStake_ Smallest stake to register with.
    /// @param unbondDelay_ Seconds between `requestUnbond` and `unbond` (1 to `MAX_UNBOND_DELAY`; the Slashing
    ///        contract also requires it to exceed its evidence age + dispute window + margin).
    /// @param treasury_ Receives slashed stake beyond reporter rewards (not zero).
    /// @param owner_ Wires the Slashing contract once (`setSlasher`).
    constructor(IERC20 credits_, uint256 minStake_, uint256 unbondDelay_, address treasury_, address owner_)
        Ownable(owner_)
    {
        if (treasury_ == address(0)) revert ZeroTreasury();
        if (unbondDelay_ == 0 || unbondDelay_ > MAX_UNBOND_DELAY) revert BadUnbondDelay();
        credits = credits_;
        minStake = minStake_;
        unbondDelay = unbondDelay_;
        treasury = treasury_;
    }

    /*//////////////////////////////////////////////////////////////
                                INTERNAL
    //////////////////////////////////////////////////////////////*/

    function _checkPeerId(string calldata peerId) internal pure {
        uint256 length = bytes(peerId).length;
        if (length == 0 || length > MAX_PEER_ID_LENGTH) revert BadPeerId();
    }

    function _registered(address node) internal view returns (Node storage n) {
        n = _nodes[node];
        if (!n.registered) revert NotRegistered();
    }

    function _checkNotFrozen(address node) internal view {
        address s = slasher;
        if (s != address(0) && ICaseBook(s).hasOpenCase(node)) revert UnbondFrozen();
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC WRITES
    //////////////////////////////////////////////////////////////*/

    /// @notice Wires the Slashing contract, once.
    /// @dev Owner only; reverts with `SlasherAlreadySet`.
    function setSlasher(address slasher_) external onlyOwner {
        if (slasher != address(0) || slasher_ == address(0)) revert SlasherAlreadySet();
        slasher = slasher_;
        emit SlasherSet(slasher_);
    }

    /// @notice Registers the caller as a node with its P2P `peerId`, bonding `stake` credits (pre-approved).
    /// @dev Reverts with `AlreadyRegistered`, `BadPeerId` or `StakeBelowMinimum`.
    function register(string calldata peerId, uint256 stake) external {
        Node storage n = _nodes[msg.sender];
        if (n.registered) revert AlreadyRegistered();
        _checkPeerId(peerId);
        if (stake < minStake || stake == 0) revert StakeBelowMinimum(stake, minStake);
        credits.safeTransferFrom(msg.sender, address(this), stake);
        n.registered = true;
        n.bonded = SafeCast.toUint128(stake);
        n.peerId = peerId;
        nodeList.push(msg.sender);
        emit NodeRegistered(msg.sender, peerId, stake);
    }

    /// @notice Changes the caller's peer id.
    /// @dev Reverts with `NotRegistered` or `BadPeerId`.
    function setPeerId(string calldata peerId) external {
        Node storage n = _registered(msg.sender);
        _checkPeerId(peerId);
        n.peerId = peerId;
        emit PeerIdUpdated(msg.sender, peerId);
    }

    /// @notice Bonds `amount` more credits (pre-approved).
    /// @dev Reverts with `NotRegistered` or `ZeroAmount`.
    function addStake(uint256 amount) external {
        Node storage n = _registered(msg.sender);
        if (amount == 0) revert ZeroAmount();
        credits.safeTransferFrom(msg.sender, address(this), amount);
        uint128 bonded = n.bonded + SafeCast.toUint128(amount);
        n.bonded = bonded;
        emit StakeAdded(msg.sender, amount, bonded);
    }

    /// @notice Starts unbonding `amount` of bonded stake; `unbond` pays it after `unbondDelay`. A second request
    ///         adds to the unbonding amount and restarts the timer.
    /// @dev Reverts with `NotRegistered`, `UnbondFrozen` (open spot-check case), `ZeroAmount` or `InsufficientStake`.
    function requestUnbond(uint256 amount) external {
        Node storage n = _registered(msg.sender);
        _checkNotFrozen(msg.sender);
        if (amount == 0) revert ZeroAmount();
        if (amount > n.bonded) revert InsufficientStake(amount, n.bonded);
        unchecked {
            // forge-lint: disable-next-line(unsafe-typecast)
            n.bonded -= uint128(amount); // safe: amount <= bonded just above
        }
        // forge-lint: disable-next-line(unsafe-typecast) -- amount <= bonded, a uint128
        n.unbonding += uint128(amount);
        uint256 at = block.timestamp + unbondDelay;
        // forge-lint: disable-next-line(unsafe-typecast) -- timestamps fit 64 bits
        n.unlockAt = uint64(at);
        emit UnbondRequested(msg.sender, amount, at);
    }

    /// @notice Pays out the caller's matured unbonding stake.
    /// @dev Reverts with `NotRegistered`, `UnbondFrozen` (open spot-check case), `NothingUnbonding` or
    ///      `UnbondLocked(unlockAt)`.
    function unbond() external returns (uint256 amount) {
        Node storage n = _registered(msg.sender);
        _checkNotFrozen(msg.sender);
        amount = n.unbonding;
        if (amount == 0) revert NothingUnbonding();
        // forge-lint: disable-next-line(block-timestamp) -- unbond delays are days, far above any validator skew
        if (block.timestamp < n.unlockAt) revert UnbondLocked(n.unlockAt);
        n.unbonding = 0;
        credits.safeTransfer(msg.sender, amount);
        emit Unbonded(msg.sender, amount);
    }

    /// @notice Takes up to `amount` of `node`'s stake (bonded first, then unbonding); `reward` of what was taken
    ///         goes to `reporter`, the rest to the treasury.
    /// @dev Slasher only (`NotSlasher`). The reward is capped at the amount actually slashed.
    /// @return slashed The amount actually taken (less than `amount` if the stake is smaller).
    function slash(address node, uint256 amount, address reporter, uint256 reward) external returns (uint256 slashed) {
        if (msg.sender != slasher) revert NotSlasher();
        Node storage n = _nodes[node];
        uint256 fromBonded = amount < n.bonded ? amount : n.bonded;
        uint256 fromUnbonding = amount - fromBonded < n.unbonding ? amount - fromBonded : n.unbonding;
        unchecked {
            // forge-lint: disable-next-line(unsafe-typecast)
            n.bonded -= uint128(fromBonded); // safe: fromBonded <= bonded
            // forge-lint: disable-next-line(unsafe-typecast)
            n.unbonding -= uint128(fromUnbonding); // safe: fromUnbonding <= unbonding
        }
        slashed = fromBonded + fromUnbonding;
        if (reward > slashed) reward = slashed;
        if (reward != 0) credits.safeTransfer(reporter, reward);
        if (slashed - reward != 0) credits.safeTransfer(treasury, slashed - reward);
        emit Slashed(node, slashed, reporter, reward);
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC READS
    //////////////////////////////////////////////////////////////*/

    /// @notice Bonded (active) stake of `node`: what routing weighs. Stake being unbonded (matured or not) is not
    ///         counted, though it stays slashable until withdrawn.
    function stakeOf(address node) external view returns (uint256) {
        return _nodes[node].bonded;
    }

    /// @notice Everything the registry knows about `node`.
    function nodeInfo(address node)
        external
        view
        returns (bool registered, string memory peerId, uint256 bonded, uint256 unbonding, uint256 unlockAt)
    {
        Node storage n = _nodes[node];
        return (n.registered, n.peerId, n.bonded, n.unbonding, n.unlockAt);
    }

    /// @notice Stake that slashing can still reach: bonded plus unbonding.
    function slashableOf(address node) external view returns (uint256) {
        return uint256(_nodes[node].bonded) + _nodes[node].unbonding;
    }

    /// @notice True when `node` has registered and still has bonded stake; a node slashed or unbonded to zero is
    ///         no longer registered for routing (it comes back with `addStake`).
    function isRegistered(address node) external view returns (bool) {
        Node storage n = _nodes[node];
        return n.registered && n.bonded != 0;
    }

    /// @notice Number of nodes that ever registered.
    function nodeCount() external view returns (uint256) {
        return nodeList.length;
    }
}
