// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {NectarFixture} from "../utils/NectarFixture.sol";
import {SettlementHandler} from "./SettlementHandler.sol";

/// @notice Escrow solvency and no-double-pay, under random deposits, withdrawals, per-node reserves, settlements (single channels and
///         both channels of a shared slot pair: ids 0..3 are two pairs per client and node; a client's channels to
///         two nodes that share a slot) and replays.
contract SettlementInvariantTest is NectarFixture {
    SettlementHandler internal handler;

    function setUp() public override {
        super.setUp();
        handler = new SettlementHandler(credits, escrow, settlement, owner, treasury);
        targetContract(address(handler));
        bytes4[] memory selectors = new bytes4[](13);
        selectors[0] = SettlementHandler.deposit.selector;
        selectors[1] = SettlementHandler.requestWithdrawal.selector;
        selectors[2] = SettlementHandler.withdraw.selector;
        selectors[3] = SettlementHandler.settle.selector;
        selectors[4] = SettlementHandler.replay.selector;
        selectors[5] = SettlementHandler.withdrawEarnings.selector;
        selectors[6] = SettlementHandler.warp.selector;
        selectors[7] = SettlementHandler.settlePair.selector; // both lanes of a shared slot in one batch
        selectors[8] = SettlementHandler.settleRoutePair.selector; // a slot shared by two nodes' channels
        selectors[9] = SettlementHandler.reserve.selector; // per-node reserves (issue 20)
        selectors[10] = SettlementHandler.requestRelease.selector;
        selectors[11] = SettlementHandler.release.selector;
        selectors[12] = SettlementHandler.overCommit.selector; // vouchers above free balance + reserve
        targetSelector(FuzzSelector({addr: address(handler), selectors: selectors}));
    }

    function _clientBalances() internal view returns (uint256 sum) {
        for (uint256 i; i < 3; ++i) {
            sum += escrow.balanceOf(handler.clients(i));
        }
    }

    function _reserves() internal view returns (uint256 sum) {
        for (uint256 c; c < 3; ++c) {
            for (uint256 n; n < 3; ++n) {
                (uint256 amount,,) = escrow.reserveOf(handler.clients(c), handler.nodes(n));
                sum += amount;
            }
        }
    }

    function _earnings() internal view returns (uint256 sum) {
        for (uint256 i; i < 3; ++i) {
            sum += escrow.earningsOf(handler.nodes(i));
        }
        sum += escrow.earningsOf(treasury);
    }

    /// @dev The vault holds exactly what clients own (free and reserved) plus what payees earned and did not withdraw.
    function invariant_EscrowIsSolvent() public view {
        assertEq(
            credits.balanceOf(address(escrow)), _clientBalances() + _reserves() + _earnings(), "escrow token balance"
        );
    }

    /// @dev Client balances (free and reserved) are deposits minus withdrawals minus settled payments, to the wei.
    function invariant_ClientAccounting() public view {
        assertEq(
            _clientBalances() + _reserves(),
            handler.ghostDeposited() - handler.ghostWithdrawn() - handler.ghostSettled(),
            "client balances"
        );
        assertEq(_earnings() + handler.ghostEarningsWithdrawn(), handler.ghostSettled(), "earnings");
    }

    /// @dev No voucher pays twice: replays never went through, and each channel's paid total is its last voucher.
    function invariant_NoVoucherPaysTwice() public view {
        assertEq(handler.ghostReplayPaid(), 0, "replay paid");
        uint256 sum;
        for (uint256 i; i < handler.channelCount(); ++i) {
            sum += handler.ghostCumulative(handler.channelKeys(i));
        }
        assertEq(sum, handler.ghostSettled(), "sum of channel totals equals what clients paid");
    }

    /// @dev Paid totals on chain match the handler's record for every channel touched.
    function invariant_PaidMatchesLastVoucher() public view {
        for (uint256 c; c < 3; ++c) {
            for (uint256 n; n < 3; ++n) {
                for (uint256 p; p < 3; ++p) {
                    for (uint64 ch; ch < 4; ++ch) {
                        address cl = handler.clients(c);
                        address nd = handler.nodes(n);
                        address partner = handler.nodes(p);
                        bytes32 key = keccak256(abi.encode(cl, nd, partner, ch));
                        assertEq(settlement.paid(cl, nd, partner, ch), handler.ghostCumulative(key), "paid per channel");
                    }
                }
            }
        }
    }
}
